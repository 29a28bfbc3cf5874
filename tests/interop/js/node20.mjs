// js-libp2p 3 is written for Node.js 22 and later; the project's machines have Node.js 20, which
// lacks Promise.withResolvers (Node 22). peer.mjs imports this module first so that it exists
// before any of libp2p's modules run. Must not live here: anything but such gaps of Node 20.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
