'use strict';
/**
 * protofly's sandbox host for JavaScript stubs: reTHINK's own protocol stubs run here unmodified.
 *
 * Its framing is node_channel.js, the stub's bus node_bus.js (both beside it).
 *
 * The process is started as a Python sandbox host (inside bubblewrap), which confines itself (no_new_privs,
 * capabilities, Landlock, seccomp) and then replaces itself with `node node_host.js SETTINGS` (see
 * protofly/sandbox/node_exec.py).  Everything the Python host set up is inherited: the namespaces, the
 * filters, the scrubbed environment and the channel, a socketpair carrying 4-byte big-endian
 * length-prefixed JSON frames (one reTHINK message or a JSON array of them), exactly as
 * protofly/sandbox/channel.py frames them.  The host then prepares the stub's context and says `ready`:
 * it is a pre-started spare, and a deploy costs only the stub's own start.
 *
 * SETTINGS (JSON): {fd, maxFrame, nodeModules, logPerSecond, isolation}; `isolation` is the report of
 * the layers applied before Node started.  The control protocol is the Python host's:
 *   create  {url, sourceCode, config, sourceCodeClassname?, sandbox}  -> 200 | 500 with the error's summary
 *   execute {method, params} to the stub's URL                        -> 200 {value} | 404 | 409 | 500
 *   delete  {url}                                                     -> 200, then the process ends
 * and every other message goes to the stub's bus listeners.  Before a `create` runs any stub code the
 * host sends its isolation report, with the rlimits the runtime applied (prlimit) as read back from
 * /proc/self/limits.
 *
 * Both reTHINK packagings are loaded (see `loadStub`): gen-2 webpack bundles (`System.register`, a
 * `default` class whose `_start(url, bus, config, factory)` starts the stub) and gen-1 browserify/UMD
 * packages (`activate(url, bus, config)` returning `{name, instance}`).  The stub's code runs in its own
 * vm context with the globals a browser stub expects (WebSocket, timers, console, fetch, TextEncoder...)
 * and without `require` or `process`; the process boundary, not the vm context, is the isolation.
 * The host runs in a network namespace with no interface: the stub's WebSocket and fetch get their
 * connections from the runtime's broker, passed in on Node's IPC channel (node_egress.js).
 * reTHINK runtime services (`factory.createSyncher` and the like), `XMLHttpRequest` and WebRTC are not
 * provided: using one fails with an error naming it.
 *
 * An uncaught exception in the stub ends the process after its last words (a `failed` update to
 * hyperty-runtime://sandbox/external), like a crash of a Python stub; the runtime's supervision decides
 * what follows.
 */

const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');

const { DEFAULT_MAX_FRAME, FrameDecoder, FrameWriter, frame } = require('./node_channel.js');
const { MiniBus } = require('./node_bus.js');
const { Egress, EgressError, brokeredFetch, brokeredWebSocket } = require('./node_egress.js');

const SANDBOX_EXTERNAL = 'hyperty-runtime://sandbox/external';
const SANDBOX_INTERNAL = 'hyperty-runtime://sandbox/internal';
/** Exit code after an uncaught exception in the stub. */
const EXIT_CRASH = 70;
/** What the Vert.x bundle compares `bufferedAmount` with; reTHINK's node-side descriptor omits it. */
const DEFAULT_MAX_BUFFER = 1000000;

/** A stub asked for something a protofly sandbox does not provide; the message names it. */
class MissingCapability extends Error {
  constructor(what, why) {
    super(`${what} is not available in protofly's Node sandbox (${why})`);
    this.name = 'MissingCapability';
  }
}

// -- the stub's globals -------------------------------------------------------------------------------

/** A console that writes one line per call, at most `perSecond` lines a second (the rest are counted). */
function boundedConsole(stdout, stderr, perSecond) {
  let windowStart = 0;
  let used = 0;
  let dropped = 0;
  const line = (stream) => (...args) => {
    const now = Date.now();
    if (now - windowStart >= 1000) {
      if (dropped) stderr.write(`protofly node host: ${dropped} console lines of the stub dropped\n`);
      windowStart = now;
      used = 0;
      dropped = 0;
    }
    if (used >= perSecond) {
      dropped += 1;
      return;
    }
    used += 1;
    stream.write(util.format(...args).slice(0, 4096) + '\n');
  };
  const out = line(stdout);
  const err = line(stderr);
  return { log: out, info: out, debug: out, trace: out, warn: err, error: err, dir: out, table: out, assert: () => {},
    group: () => {}, groupEnd: () => {}, time: () => {}, timeEnd: () => {} };
}

function unavailable(what, why) {
  return class {
    constructor() {
      throw new MissingCapability(what, why);
    }
  };
}

/**
 * The global WebSocket.  With an `egress` (the sandbox) it is the pinned `ws` package's class connected
 * through the runtime's broker, on every Node version: Node 22's built-in one cannot be handed a socket.
 * Without one (the host's own tests) Node's built-in is used where there is one.
 */
function webSocketClass(nodeModules, egress) {
  if (!egress && typeof globalThis.WebSocket === 'function') return globalThis.WebSocket;
  const candidates = nodeModules ? [path.join(nodeModules, 'ws')] : [];
  candidates.push('ws');
  for (const candidate of candidates) {
    try {
      const WS = require(candidate);
      return egress ? brokeredWebSocket(WS, egress) : WS;
    } catch (err) {
      // try the next one
    }
  }
  return unavailable('WebSocket', `the pinned 'ws' package, through which the runtime hands a stub its connections, is not installed: run 'npm ci' in the protofly checkout`);
}

/** A `factory` whose every service throws, naming it: protofly does not run reTHINK's runtime services. */
function missingFactory() {
  return new Proxy({}, {
    get(target, name) {
      if (typeof name !== 'string' || name === 'then') return undefined;
      return () => {
        throw new MissingCapability(`factory.${name}`, "reTHINK's runtime services (Syncher, Discovery, ...) are not provided to stubs");
      };
    },
  });
}

/** The stub's globals; `egress` (the host's broker client) connects its WebSocket and fetch. */
function stubContext(settings, egress) {
  const WebSocket = webSocketClass(settings.nodeModules, egress);
  const globals = {
    console: boundedConsole(process.stdout, process.stderr, settings.logPerSecond || 200),
    setTimeout, clearTimeout, setInterval, clearInterval, setImmediate, clearImmediate, queueMicrotask,
    WebSocket,
    TextEncoder, TextDecoder, URL, URLSearchParams,
    atob: globalThis.atob, btoa: globalThis.btoa,
    fetch: egress ? brokeredFetch(egress) : globalThis.fetch, Headers: globalThis.Headers, Request: globalThis.Request, Response: globalThis.Response,
    structuredClone: globalThis.structuredClone,
    XMLHttpRequest: unavailable('XMLHttpRequest', 'use WebSocket or fetch'),
    RTCPeerConnection: unavailable('RTCPeerConnection (WebRTC)', 'stubs cannot open peer connections'),
    SockJS: unavailable('SockJS', "give the stub a 'ws://' or 'wss://' URL"),
  };
  const context = vm.createContext(globals, { name: 'protofly stub', codeGeneration: { strings: true, wasm: false } });
  vm.runInContext('globalThis.self = globalThis; globalThis.global = globalThis;', context);
  return context;
}

// -- loading --------------------------------------------------------------------------------------------

/**
 * Evaluate `sourceCode` and return a function `start(url, bus, config, factory)` -> the stub instance.
 *
 * gen-2: `System.register([], declare)` — the `default` export is a class: `new`, then `_start`.
 * gen-1: UMD/browserify — `module.exports` (or a global `activate`), a function `activate(url, bus,
 * config, factory)` returning `{name, instance}` or the instance; `activate.default` and a module object
 * holding `activate` or `sourceCodeClassname` are accepted too.
 */
function loadStub(sourceCode, { classname, filename = 'stub.js', context } = {}) {
  const ctx = context || stubContext({});
  const registered = [];
  const module = { exports: {} };
  ctx.module = module;
  ctx.exports = module.exports;
  ctx.System = {
    register(deps, declare) {
      if (typeof deps === 'function') {
        declare = deps;
        deps = [];
      }
      if (Array.isArray(deps) && deps.length) {
        throw new MissingCapability(`System.register dependencies (${deps.join(', ')})`, 'a stub bundle must be self-contained');
      }
      const exports = {};
      const exporter = (name, value) => {
        if (name !== null && typeof name === 'object') {
          for (const key of Object.keys(name)) exports[key] = name[key];
          if ('default' in name) exports.default = name.default;
        } else {
          exports[name] = value;
        }
        return value;
      };
      const declared = declare(exporter, { id: filename, meta: { url: filename } });
      if (declared && typeof declared.execute === 'function') declared.execute();
      registered.push(exports);
    },
  };
  vm.runInContext(sourceCode, ctx, { filename });
  delete ctx.System;
  if (registered.length) {
    const Stub = registered[registered.length - 1].default;
    if (typeof Stub !== 'function') throw new TypeError('the System.register bundle exports no default class');
    return (url, bus, config, factory) => {
      const instance = new Stub();
      if (typeof instance._start !== 'function') throw new TypeError("the bundle's default class has no _start method");
      instance._start(url, bus, config, factory);
      return instance;
    };
  }
  const exported = module.exports;
  const candidates = [exported, exported && exported.default, exported && exported.activate, ctx.activate,
    classname ? exported && exported[classname] : undefined, classname ? ctx[classname] : undefined];
  const found = candidates.find((c) => typeof c === 'function');
  if (!found) {
    throw new TypeError('the stub exports nothing to start: expected System.register with a default class, '
      + 'or activate(url, bus, config) via module.exports or a global');
  }
  return (url, bus, config, factory) => {
    if (found.prototype && typeof found.prototype._start === 'function') {
      const instance = new found();
      instance._start(url, bus, config, factory);
      return instance;
    }
    const result = found(url, bus, config, factory);
    return result && typeof result === 'object' && result.instance ? result.instance : result;
  };
}

// -- the host ---------------------------------------------------------------------------------------------

function describe(err) {
  // Errors thrown by the stub come from its own vm context: another realm, so no `instanceof Error`.
  if (err !== null && typeof err === 'object' && typeof err.message === 'string') return `${err.name || 'Error'}: ${err.message}`;
  return `${typeof err}: ${String(err)}`;
}

class Host {
  constructor(settings, write, exit) {
    this.settings = settings;
    this.writer = new FrameWriter(write, settings.maxFrame || DEFAULT_MAX_FRAME);
    this.exit = exit;
    this.url = null;
    this.stub = null;
    this.bus = null;
    this.backlog = [];
    this.status = null;
    this.statusWaiters = [];
    this.egress = new Egress((msg) => this.send(msg), false); // main() gives it the IPC channel
  }

  /** The stub's messages to the runtime; its status updates are also noted (see `disconnected`). */
  fromStub(msg) {
    if (msg.type === 'update' && msg.to === `${this.url}/status` && msg.body) {
      this.status = msg.body.value;
      const waiters = this.statusWaiters;
      this.statusWaiters = [];
      for (const waiter of waiters) waiter(this.status);
    }
    this.send(msg);
  }

  /**
   * Resolves once the stub reports `disconnected` (or `failed`), or after `ms`: reTHINK stubs start their
   * close in `disconnect()` and report the outcome later, when the node has closed the socket.
   */
  disconnected(ms) {
    const done = (value) => value === 'disconnected' || value === 'failed';
    return new Promise((resolve) => {
      if (done(this.status)) return resolve(this.status);
      let settled = false;
      const timer = setTimeout(() => {
        settled = true;
        resolve(this.status);
      }, ms);
      const waiter = (value) => {
        if (settled) return undefined;
        if (!done(value)) return this.statusWaiters.push(waiter);
        settled = true;
        clearTimeout(timer);
        return resolve(value);
      };
      this.statusWaiters.push(waiter);
    });
  }

  send(msg) {
    this.writer.add(msg);
  }

  respond(request, code, description, value) {
    const body = { code };
    if (description) body.description = description;
    if (value !== undefined) body.value = value;
    const answer = { id: request.id, type: 'response', from: request.to, to: request.from, body };
    try {
      this.send(answer);
    } catch (err) {
      this.send({ ...answer, body: { code: 500, description: `the response cannot be sent (${describe(err)})` } });
    }
  }

  /** The last words before an exit: written synchronously, since nothing after them may run. */
  lastWords(description) {
    this.writer.flush();
    const body = { value: 'failed', description };
    this.writer.parts.push(Buffer.from(JSON.stringify({ type: 'update', from: SANDBOX_INTERNAL, to: SANDBOX_EXTERNAL, body })));
    this.writer.flush();
  }

  receive(msg) {
    if (msg.from === SANDBOX_EXTERNAL) this.control(msg);
    else this.toStub(msg);
  }

  control(msg) {
    if (msg.type === 'create') this.create(msg);
    else if (msg.type === 'execute') this.execute(msg);
    else if (msg.type === 'delete') {
      this.respond(msg, 200);
      this.writer.flush();
      this.exit(0);
    } else if (msg.type === 'read' && msg.body && msg.body.resource === 'liveness') this.pong(msg);
    else if (msg.type === 'response') this.egress.onAnswer(msg);
    else this.respond(msg, 400, `unknown control message type ${JSON.stringify(msg.type)}`);
  }

  /** The runtime's liveness ping (protofly.liveness), answered on the event loop the stub runs on: a stub that
   * blocks it leaves the ping unanswered and is ended as unresponsive. A JavaScript stub refreshes its `live`
   * status itself, so the answer carries no SDK state. */
  pong(msg) {
    this.respond(msg, 200, undefined, {});
  }

  /** The layers in force, sent before any stub code runs (the stub cannot alter what was reported). */
  reportIsolation(limits) {
    if (!this.settings.isolation || this.reported) return;
    this.reported = true;
    const report = { ...this.settings.isolation, missing: [...(this.settings.isolation.missing || [])] };
    const problem = rlimitsProblem(limits, readLimits());
    if (problem) {
      report.rlimits = false;
      report.missing.unshift(`rlimits: ${problem}`);
    } else {
      report.rlimits = { ...limits, memory: 'RLIMIT_DATA under the V8 heap limit' };
    }
    this.send({ type: 'update', from: SANDBOX_INTERNAL, to: SANDBOX_EXTERNAL, body: { value: 'isolation', report } });
    this.writer.flush();
  }

  create(msg) {
    const body = msg.body || {};
    if (this.stub) return this.respond(msg, 500, `this sandbox already runs ${this.url}`);
    if (typeof body.url !== 'string' || !body.url) return this.respond(msg, 400, 'create: body.url must be a non-empty string');
    if (typeof body.sourceCode !== 'string') return this.respond(msg, 400, 'create: body.sourceCode must be a string');
    const config = body.config || {};
    if (typeof config !== 'object' || Array.isArray(config)) return this.respond(msg, 400, 'create: body.config must be an object');
    this.url = body.url;
    this.reportIsolation(body.sandbox);
    this.bus = new MiniBus((out) => this.fromStub(out));
    try {
      const context = this.context || stubContext(this.settings, this.egress);
      this.context = null;
      const start = loadStub(body.sourceCode, { classname: body.sourceCodeClassname, filename: `${body.url}.js`, context });
      const stubConfig = vm.runInContext('(text) => JSON.parse(text)', context)(JSON.stringify(withDefaults(config)));
      this.stub = start(body.url, this.bus, stubConfig, missingFactory());
      if (!this.stub) throw new TypeError('the stub started but returned no instance');
    } catch (err) {
      this.stub = null;
      return this.respond(msg, 500, describe(err));
    }
    this.respond(msg, 200);
    const backlog = this.backlog;
    this.backlog = [];
    for (const queued of backlog) this.toStub(queued);
  }

  async execute(msg) {
    const body = msg.body || {};
    const params = body.params === undefined || body.params === null ? [] : body.params;
    if (!this.stub) return this.respond(msg, 409, 'no stub is deployed in this sandbox');
    if (typeof body.method !== 'string' || !Array.isArray(params)) {
      return this.respond(msg, 400, 'execute needs body.method (a string) and body.params (a list)');
    }
    const method = this.stub[body.method];
    if (typeof method !== 'function' || body.method.startsWith('_') || body.method === 'constructor') {
      return this.respond(msg, 404, `the stub has no method ${JSON.stringify(body.method)}`);
    }
    try {
      const value = await method.apply(this.stub, params);
      if (body.method === 'disconnect') await this.disconnected(this.settings.disconnectWaitMs || 1000);
      this.respond(msg, 200, undefined, jsonValue(value));
    } catch (err) {
      this.respond(msg, 500, describe(err));
    }
  }

  toStub(msg) {
    if (!this.stub) {
      if (this.backlog.length < 10000) this.backlog.push(msg);
      return;
    }
    this.bus._onMessage(msg);
  }
}

/** This process's rlimits, from /proc/self/limits: {name: soft limit or null (unlimited)}. */
function readLimits() {
  const out = {};
  try {
    for (const line of fs.readFileSync('/proc/self/limits', 'utf8').split('\n').slice(1)) {
      const match = /^(.+?)\s{2,}(\S+)\s+(\S+)/.exec(line);
      if (match) out[match[1].trim()] = match[2] === 'unlimited' ? null : Number(match[2]);
    }
  } catch (err) {
    return null;
  }
  return out;
}

/** What differs between the stub's limits and the process's (null when they are in force). */
function rlimitsProblem(limits, actual) {
  if (!limits) return 'none requested';
  if (!actual) return 'cannot read /proc/self/limits';
  const wanted = { 'Max data size': limits.memory_mb * 1048576, 'Max open files': limits.open_files };
  for (const [name, value] of Object.entries(wanted)) {
    if (actual[name] !== value) return `${name} is ${actual[name] === null ? 'unlimited' : actual[name]}, not ${value}`;
  }
  if (actual['Max cpu time'] === null) return 'Max cpu time is unlimited';
  return null;
}

/** Configuration defaults for known quirks of reTHINK's bundles (documented in docs/stub-authoring.md). */
function withDefaults(config) {
  const out = { ...config };
  if (out.maxBuffer === undefined) out.maxBuffer = DEFAULT_MAX_BUFFER;
  return out;
}

/** A method's result as JSON can carry it (undefined stays undefined; what cannot be encoded is dropped). */
function jsonValue(value) {
  if (value === undefined) return undefined;
  try {
    return JSON.parse(JSON.stringify(value));
  } catch (err) {
    return undefined;
  }
}

function main(argv) {
  let settings;
  try {
    settings = JSON.parse(argv[0]);
    if (!Number.isInteger(settings.fd)) throw new TypeError('fd');
  } catch (err) {
    process.stderr.write("usage: node node_host.js '{\"fd\": N, ...}'\n");
    process.exit(2);
  }
  const socket = new net.Socket({ fd: settings.fd, readable: true, writable: true });
  let exiting = false;
  const exit = (code) => {
    if (exiting) return;
    exiting = true;
    socket.end(() => process.exit(code));
    setTimeout(() => process.exit(code), 200).unref();
  };
  const host = new Host(settings, (data) => {
    if (!socket.destroyed) socket.write(data);
  }, exit);
  const crash = (err) => {
    const description = `uncaught ${describe(err)}`;
    process.stderr.write(`protofly node host: ${description}\n${err && err.stack ? err.stack : ''}\n`);
    try {
      host.lastWords(description);
    } finally {
      exit(EXIT_CRASH);
    }
  };
  process.on('uncaughtException', crash);
  process.on('unhandledRejection', crash);
  const decoder = new FrameDecoder(settings.maxFrame || DEFAULT_MAX_FRAME, (kind, size) => {
    process.stderr.write(`protofly node host: dropped a frame from the runtime: ${kind} (${size} bytes)\n`);
  });
  socket.on('data', (data) => {
    for (const msg of decoder.feed(data)) host.receive(msg);
  });
  socket.on('close', () => exit(0));
  socket.on('error', () => exit(0));
  // The stub's connections arrive as handles on Node's IPC channel (NODE_CHANNEL_FD, set by node_exec.py).
  host.egress.channel = Boolean(process.channel);
  if (process.channel) process.on('message', (msg, handle) => host.egress.onHandle(msg, handle));
  host.context = stubContext(settings, host.egress);  // prepared while idle: a deploy only evaluates the stub
  host.send({ type: 'update', from: SANDBOX_INTERNAL, to: SANDBOX_EXTERNAL,
    body: { value: 'ready', pid: process.pid, node: process.version } });
}

module.exports = {
  DEFAULT_MAX_BUFFER, Egress, EgressError, FrameDecoder, FrameWriter, Host, MiniBus, MissingCapability, frame, loadStub, main,
  missingFactory, rlimitsProblem, stubContext, withDefaults,
};

if (require.main === module) main(process.argv.slice(2));
