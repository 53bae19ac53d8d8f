'use strict';
/** The bus a reTHINK stub is given in protofly's Node host (see MiniBus below). */

const { isMessage } = require('./node_channel.js');

/**
 * What reTHINK hands a stub as `bus`: `addListener(url, cb)` ('*' receives everything addressed to the
 * stub), `postMessage(msg, responseCallback?)` out to the runtime, and `_onMessage(msg)`, the inbound
 * path the host calls.  A response to a message posted with a callback goes to that callback (keyed
 * by the message's `from` and `id`; ids are assigned when missing, as reTHINK's MiniBus does).
 */
class MiniBus {
  constructor(send, maxCallbacks = 10000) {
    this._send = send;
    this._listeners = new Map();
    this._callbacks = new Map();
    this._maxCallbacks = maxCallbacks;
    this._nextId = 0;
  }

  addListener(url, listener) {
    if (typeof listener !== 'function') throw new TypeError('bus.addListener: the listener must be a function');
    const list = this._listeners.get(url) || [];
    list.push(listener);
    this._listeners.set(url, list);
    const listeners = this._listeners;
    return {
      remove() {
        const current = listeners.get(url) || [];
        const index = current.indexOf(listener);
        if (index >= 0) current.splice(index, 1);
      },
    };
  }

  removeAllListenersOf(url) {
    this._listeners.delete(url);
  }

  postMessage(msg, responseCallback) {
    if (!isMessage(msg)) throw new TypeError('bus.postMessage: expected a message object');
    if (msg.id === undefined || msg.id === null) msg.id = ++this._nextId;
    if (typeof responseCallback === 'function' && this._callbacks.size < this._maxCallbacks) {
      this._callbacks.set(`${msg.from}\u0000${msg.id}`, responseCallback);
    }
    this._send(msg);
    return msg.id;
  }

  _onMessage(msg) {
    if (msg.type === 'response') {
      const key = `${msg.to}\u0000${msg.id}`;
      const callback = this._callbacks.get(key);
      if (callback) {
        const code = msg.body && msg.body.code;
        if (!(typeof code === 'number' && code < 200)) this._callbacks.delete(key);
        callback(msg);
        return;
      }
    }
    const exact = this._listeners.get(msg.to);
    const targets = exact && exact.length ? exact : this._listeners.get('*') || [];
    for (const listener of targets.slice()) listener(msg);
  }
}

module.exports = { MiniBus };
