'use strict';
/**
 * A JavaScript stub's network: every connection comes from the runtime's broker, as a Python stub's does.
 *
 * The Node host runs in a network namespace with no interface but its own loopback, so a stub reaches
 * nothing by itself.  Its `WebSocket` and `fetch` ask the runtime instead: `execute {method:
 * "open-connection", params: [url]}` from hyperty-runtime://sandbox/internal to .../sandbox/external on the
 * message channel, exactly the Python host's request (protofly/sandbox/host.py).  The runtime checks the
 * URL against the stub's signed `egress`, connects with its resolver map and timeouts, and passes the
 * connected socket back with SCM_RIGHTS.
 *
 * Node cannot receive a descriptor on an arbitrary socket, but it can on its IPC channel: the host is
 * started with NODE_CHANNEL_FD naming a unix stream socket (the runtime keeps the other end), and the
 * runtime sends each socket as Node's own handle message, `{"cmd": "NODE_HANDLE", "type": "net.Socket",
 * "msg": {"protofly": "egress", "id": ID}}` + "\n" with the descriptor attached.  Node turns it into a
 * `net.Socket` delivered by `process.on('message')` (and ACKs it on the channel; the runtime discards
 * the ACKs).  The socket and the `200` answer travel on two channels, so either may come first: a request
 * completes when both have arrived.  For `wss:`/`https:` the stub's side wraps the socket in TLS
 * (`tls.connect({socket})`), checking the server's certificate against the URL's host.
 *
 * Refusals are `EgressError`s with the runtime's code and description (403 undeclared, 400 malformed, 502
 * unreachable, 504 timed out, 429 too many at once), counted by the runtime as for a Python stub.
 */

const http = require('http');
const https = require('https');
const net = require('net');
const tls = require('tls');

const SANDBOX_EXTERNAL = 'hyperty-runtime://sandbox/external';
const SANDBOX_INTERNAL = 'hyperty-runtime://sandbox/internal';
/** How long a request waits for the runtime (its connect timeout is shorter: this covers a silent runtime). */
const OPEN_WAIT_MS = 60000;
/** How long the socket may trail its `200` answer (both are sent before the answer; this is a bound). */
const HANDLE_WAIT_MS = 5000;
/** Requests a stub may have outstanding at once (the Python host's bound). */
const MAX_OPENING = 32;
/** Sockets received and not yet claimed beyond which the oldest are closed. */
const MAX_UNCLAIMED = 64;
/** Largest response body `fetch` collects (the stub's memory limit is the other bound). */
const MAX_FETCH_BODY = 16 << 20;
/** Seconds of silence after which a `fetch` is abandoned. */
const FETCH_IDLE_MS = 60000;

/** A connection the runtime would not or could not open; `code` is HTTP-style, like the Python SDK's. */
class EgressError extends Error {
  constructor(code, description) {
    super(description);
    this.name = 'EgressError';
    this.code = code;
  }
}

/** The host's end of brokered connections: requests out on the message channel, sockets in on the IPC one. */
class Egress {
  /**
   * @param send    writes one message to the runtime's message channel
   * @param channel whether the IPC channel exists (without it every request is refused, naming why)
   */
  constructor(send, channel) {
    this.send = send;
    this.channel = channel;
    this.nextId = 0;
    this.pending = new Map(); // id -> {answer, socket, resolve, reject, timer}
    this.unclaimed = new Map(); // id -> net.Socket received before (or without) its request
  }

  /** A connected socket to `url`, or an EgressError. */
  open(url) {
    if (!this.channel) {
      return Promise.reject(new EgressError(403, `egress: ${url} refused: this sandbox has no socket channel`));
    }
    if (this.pending.size >= MAX_OPENING) {
      return Promise.reject(new EgressError(429, `egress: ${url} refused: ${MAX_OPENING} connections are being opened already`));
    }
    this.nextId += 1;
    const id = this.nextId;
    return new Promise((resolve, reject) => {
      const entry = { answer: null, socket: null, resolve, reject, url };
      entry.timer = setTimeout(() => this.fail(id, new EgressError(504, `egress: the runtime did not answer for ${url} within ${OPEN_WAIT_MS / 1000} s`)), OPEN_WAIT_MS);
      this.pending.set(id, entry);
      const early = this.unclaimed.get(String(id));
      if (early) {
        this.unclaimed.delete(String(id));
        entry.socket = early;
      }
      this.send({ id, type: 'execute', from: SANDBOX_INTERNAL, to: SANDBOX_EXTERNAL,
        body: { method: 'open-connection', params: [url] } });
    });
  }

  /** The runtime's answer to an `open-connection` request (true if it was one). */
  onAnswer(msg) {
    const entry = this.pending.get(msg.id);
    if (!entry || entry.answer) return false;
    const body = msg.body || {};
    if (body.code !== 200) {
      const code = Number.isInteger(body.code) ? body.code : 500;
      this.fail(msg.id, new EgressError(code, String(body.description || `egress: ${entry.url} refused`)));
      return true;
    }
    entry.answer = msg;
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => this.fail(msg.id, new EgressError(502, `egress: the runtime answered for ${entry.url} without passing a socket`)), HANDLE_WAIT_MS);
    this.settle(msg.id);
    return true;
  }

  /** A socket passed by the runtime (Node's IPC `message` event); anything else on the channel is ignored. */
  onHandle(msg, socket) {
    if (!msg || msg.protofly !== 'egress' || !socket) {
      if (socket && typeof socket.destroy === 'function') socket.destroy();
      return;
    }
    const id = Number(msg.id);
    const entry = this.pending.get(id);
    if (!entry || entry.socket) {
      this.unclaimed.set(String(msg.id), socket);
      while (this.unclaimed.size > MAX_UNCLAIMED) {
        const [oldest, stale] = this.unclaimed.entries().next().value;
        this.unclaimed.delete(oldest);
        stale.destroy();
      }
      return;
    }
    entry.socket = socket;
    this.settle(id);
  }

  settle(id) {
    const entry = this.pending.get(id);
    if (!entry || !entry.answer || !entry.socket) return;
    clearTimeout(entry.timer);
    this.pending.delete(id);
    entry.socket.setNoDelay(true);
    entry.resolve(entry.socket);
  }

  fail(id, err) {
    const entry = this.pending.get(id);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.pending.delete(id);
    if (entry.socket) entry.socket.destroy();
    entry.reject(err);
  }
}

/** `url` as the broker matches it, and what the stub's side must add (TLS, and for whom). */
function target(url, aliases) {
  const parsed = new URL(String(url));
  const scheme = parsed.protocol.slice(0, -1).toLowerCase();
  const brokered = aliases[scheme] || scheme;
  parsed.protocol = `${brokered}:`;
  const host = parsed.hostname.replace(/^\[|\]$/g, '');
  return { url: parsed.toString(), secure: brokered === 'wss' || brokered === 'https', host };
}

/** An `http.request`/`ws` `createConnection(options, oncreate)` that gets its socket from the broker. */
function connector(egress, url, aliases) {
  const to = target(url, aliases);
  return (options, oncreate) => {
    egress.open(to.url).then((socket) => {
      if (!to.secure) return oncreate(null, socket);
      const secured = tls.connect({
        socket,
        host: to.host,
        servername: net.isIP(to.host) ? undefined : to.host,
        ALPNProtocols: options && options.ALPNProtocols,
        ca: options && options.ca,
      });
      return oncreate(null, secured);
    }, (err) => oncreate(err));
    return undefined;
  };
}

/** The stub's global WebSocket: `ws`'s class, connected through the broker (URL and protocols as a browser's). */
function brokeredWebSocket(WS, egress) {
  const aliases = { http: 'ws', https: 'wss' };
  class WebSocket extends WS {
    constructor(url, protocols) {
      super(url, protocols === undefined ? [] : protocols, { createConnection: connector(egress, url, aliases) });
    }
  }
  Object.defineProperty(WebSocket, 'name', { value: 'WebSocket' });
  return WebSocket;
}

function requestBody(body) {
  if (body === undefined || body === null) return null;
  if (typeof body === 'string') return Buffer.from(body);
  if (body instanceof URLSearchParams) return Buffer.from(body.toString());
  if (ArrayBuffer.isView(body)) return Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof ArrayBuffer) return Buffer.from(body);
  if (typeof body === 'object' && typeof body.byteLength === 'number') return Buffer.from(body); // another realm
  throw new TypeError('fetch: body must be a string, URLSearchParams or bytes in protofly\'s sandbox');
}

/**
 * The stub's global fetch: one HTTP/1.1 exchange through a brokered connection, answered as a `Response`.
 * Redirects are returned, not followed (each target would need declaring anyway); the body is read whole.
 */
function brokeredFetch(egress) {
  const aliases = {};
  return function fetch(input, init = {}) {
    return new Promise((resolve, reject) => {
      const url = typeof input === 'string' || input instanceof URL ? String(input) : String(input && input.url);
      let parsed;
      try {
        parsed = new URL(url);
        if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new TypeError(`fetch: ${parsed.protocol} is not http: or https:`);
      } catch (err) {
        reject(err);
        return;
      }
      const headers = new Headers(init.headers || (input && typeof input === 'object' && input.headers) || undefined);
      let body;
      try {
        body = requestBody(init.body);
      } catch (err) {
        reject(err);
        return;
      }
      const plain = {};
      headers.forEach((value, name) => { plain[name] = value; });
      if (body) plain['content-length'] = String(body.length);
      const module = parsed.protocol === 'https:' ? https : http;
      const req = module.request(parsed, {
        method: (init.method || (input && input.method) || 'GET').toUpperCase(),
        headers: plain,
        createConnection: connector(egress, url, aliases),
      });
      req.setTimeout(FETCH_IDLE_MS, () => req.destroy(new EgressError(504, `fetch: ${url} sent nothing for ${FETCH_IDLE_MS / 1000} s`)));
      req.on('error', reject);
      req.on('response', (res) => {
        const chunks = [];
        let size = 0;
        res.on('data', (chunk) => {
          size += chunk.length;
          if (size > MAX_FETCH_BODY) {
            res.destroy(new RangeError(`fetch: ${url} answered more than ${MAX_FETCH_BODY} bytes`));
            return;
          }
          chunks.push(chunk);
        });
        res.on('error', reject);
        res.on('end', () => {
          const empty = res.statusCode === 204 || res.statusCode === 304 || res.statusCode < 200;
          const answer = new Response(empty ? null : Buffer.concat(chunks), {
            status: res.statusCode, statusText: res.statusMessage, headers: res.headers });
          resolve(answer);
        });
      });
      req.end(body || undefined);
    });
  };
}

module.exports = { EgressError, Egress, HANDLE_WAIT_MS, MAX_OPENING, brokeredFetch, brokeredWebSocket, connector };
