// A js-libp2p peer for tasknet's interop tests (tests/test_interop_js.py): TCP, Noise, Yamux,
// identify, ping and GossipSub with js's default signature policy (StrictSign), on 127.0.0.1.
// Lives here: starting the node, dialing tasknet, reporting what it sees as JSON lines on stdout.
// Must not live here: any check of tasknet's behaviour (the Python test asserts).
//
// usage: node peer.mjs --dial <multiaddr/p2p/id> --topic <topic> [--seed <64 hex chars>]
// stdout, one JSON object per line: {"event": "ready", "peer_id", "addrs"}, "connected",
//   "subscribed" (a peer joined the topic), "graft" (mesh), "message" (from, seqno, data hex),
//   "published" / "publish_failed".
// stdin, one JSON object per line: {"publish": "<hex>"} publishes those bytes to the topic.
import './node20.mjs' // first: fills Node 20's gaps before libp2p's modules run
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { generateKeyPair, generateKeyPairFromSeed } from '@libp2p/crypto/keys'
import { gossipsub } from '@libp2p/gossipsub'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

const { values: args } = parseArgs({
  options: {
    dial: { type: 'string' },
    topic: { type: 'string' },
    seed: { type: 'string' }
  }
})
if (args.dial == null || args.topic == null) {
  process.stderr.write('usage: node peer.mjs --dial <multiaddr> --topic <topic> [--seed <hex>]\n')
  process.exit(2)
}

const say = (event, fields = {}) => {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')
}
const hex = (bytes) => Buffer.from(bytes ?? []).toString('hex')

const privateKey = args.seed != null
  ? await generateKeyPairFromSeed('Ed25519', Buffer.from(args.seed, 'hex'))
  : await generateKeyPair('Ed25519')

const node = await createLibp2p({
  privateKey,
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    pubsub: gossipsub({ globalSignaturePolicy: 'StrictSign', allowPublishToZeroTopicPeers: true })
  }
})
const pubsub = node.services.pubsub

node.addEventListener('peer:connect', (evt) => say('connected', { peer: evt.detail.toString() }))
pubsub.addEventListener('subscription-change', (evt) => {
  for (const sub of evt.detail.subscriptions) {
    say('subscribed', { peer: evt.detail.peerId.toString(), topic: sub.topic, on: sub.subscribe })
  }
})
pubsub.addEventListener('gossipsub:graft', (evt) => {
  say('graft', { peer: evt.detail.peerId.toString(), topic: evt.detail.topic })
})
pubsub.addEventListener('message', (evt) => {
  const msg = evt.detail
  say('message', {
    topic: msg.topic,
    type: msg.type,
    from: msg.type === 'signed' ? msg.from.toString() : null,
    seqno: msg.type === 'signed' ? msg.sequenceNumber.toString(16).padStart(16, '0') : null,
    data: hex(msg.data)
  })
})

pubsub.subscribe(args.topic)
say('ready', { peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

const lines = createInterface({ input: process.stdin })
lines.on('line', async (line) => {
  try {
    const command = JSON.parse(line)
    const result = await pubsub.publish(args.topic, Buffer.from(command.publish, 'hex'))
    say('published', { recipients: result.recipients.map(String) })
  } catch (err) {
    say('publish_failed', { error: String(err) })
  }
})

const stop = async () => {
  await node.stop()
  process.exit(0)
}
lines.on('close', stop)
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

try {
  await node.dial(multiaddr(args.dial))
} catch (err) {
  say('dial_failed', { error: String(err) })
}
