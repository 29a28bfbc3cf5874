// A js-libp2p peer for tasknet's interop tests (tests/test_interop_js.py): TCP, Noise, Yamux,
// identify, ping and GossipSub with js's default signature policy (StrictSign), on 127.0.0.1.
// Lives here: starting the node, dialing tasknet, reporting what it sees as JSON lines on stdout.
// Must not live here: any check of tasknet's behaviour (the Python test asserts).
//
// usage: node peer.mjs [--dial <multiaddr/p2p/id>] --topic <topic> [--seed <64 hex chars>]
//   (without --dial it only listens, for tasknet to dial it)
// stdout, one JSON object per line: {"event": "ready", "peer_id", "addrs"}, "connected",
//   "subscribed" (a peer joined the topic), "graft" (mesh), "message" (from, seqno, data hex),
//   "published" / "publish_failed", "pong" (peer, rtt_ms) / "ping_failed",
//   "identified" (peer, protocols, agent: what identify told this peer) / "identify_failed".
// stdin, one JSON object per line: {"publish": "<hex>"} publishes those bytes to the topic;
//   {"ping": "<peer id>"} pings that peer over /ipfs/ping/1.0.0; {"identify": "<peer id>"}
//   reports what the peer store holds of it.
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
if (args.topic == null) {
  process.stderr.write('usage: node peer.mjs [--dial <multiaddr>] --topic <topic> [--seed <hex>]\n')
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
const connectionTo = (peer) => node.getConnections().find((c) => c.remotePeer.toString() === peer)

const commands = {
  async publish (data) {
    try {
      const result = await pubsub.publish(args.topic, Buffer.from(data, 'hex'))
      say('published', { recipients: result.recipients.map(String) })
    } catch (err) {
      say('publish_failed', { error: String(err) })
    }
  },
  async ping (peer) {
    try {
      const conn = connectionTo(peer)
      if (conn == null) throw new Error(`not connected to ${peer}`)
      const rtt = await node.services.ping.ping(conn.remotePeer)
      say('pong', { peer, rtt_ms: rtt })
    } catch (err) {
      say('ping_failed', { peer, error: String(err) })
    }
  },
  async identify (peer) {
    try {
      const conn = connectionTo(peer)
      if (conn == null) throw new Error(`not connected to ${peer}`)
      const result = await node.services.identify.identify(conn)
      say('identified', { peer, protocols: result.protocols, agent: result.agentVersion ?? null })
    } catch (err) {
      say('identify_failed', { peer, error: String(err) })
    }
  }
}

lines.on('line', async (line) => {
  let command
  try {
    command = JSON.parse(line)
  } catch (err) {
    say('bad_command', { error: String(err) })
    return
  }
  for (const [name, value] of Object.entries(command)) {
    if (commands[name] == null) say('bad_command', { error: `unknown command ${name}` })
    else await commands[name](value)
  }
})

const stop = async () => {
  await node.stop()
  process.exit(0)
}
lines.on('close', stop)
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

if (args.dial != null) {
  try {
    await node.dial(multiaddr(args.dial))
  } catch (err) {
    say('dial_failed', { error: String(err) })
  }
}
