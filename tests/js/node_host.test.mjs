// Tests of the Node sandbox host (src/protofly/sandbox/node_host.js), run by `make test` via `node --test`.
// The reTHINK bundles are the published artefacts vendored under tests/conformance/data (see SOURCES.md).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const host = require('../../src/protofly/sandbox/node_host.js');
const DATA = new URL('../conformance/data/', import.meta.url);
const STUB_URL = 'runtime://x.test/protostub/1';
const RUNTIME = 'runtime://rt.test/r1';

function framed(value) {
  return host.frame([Buffer.from(JSON.stringify(value))]);
}

/** A WebSocket the test drives: records what the stub sends, opens and answers on request. */
class FakeSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.readyState = 0;
    this.bufferedAmount = 0;
    FakeSocket.last = this;
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  open() {
    this.readyState = 1;
    this.onopen();
  }
  receive(msg) {
    this.onmessage({ data: JSON.stringify(msg) });
  }
}

function contextWithFakeSocket() {
  const context = host.stubContext({});
  context.WebSocket = FakeSocket;
  return context;
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

test('frames: split headers, batches and an oversized frame skipped without being buffered', () => {
  const errors = [];
  const decoder = new host.FrameDecoder(128, (kind, size) => errors.push([kind, size]));
  const one = framed({ type: 'update', from: 'a', to: 'b' });
  const batch = framed([{ type: 'update', from: 'a', to: 'b', id: 1 }, { type: 'update', from: 'a', to: 'b', id: 2 }]);
  const big = framed({ type: 'update', from: 'a', to: 'b', body: { pad: 'x'.repeat(200) } });
  const bytes = Buffer.concat([one, big, batch, framed('not a message')]);
  const out = [];
  for (let i = 0; i < bytes.length; i += 3) out.push(...decoder.feed(bytes.subarray(i, i + 3)));
  assert.deepEqual(out.map((m) => m.id), [undefined, 1, 2]);
  assert.deepEqual(errors.map(([kind]) => kind), ['oversized', 'invalid']);
  assert.equal(decoder.buffer.length, 0);
});

test('frames: messages queued in one turn leave as one batch frame; a message too large is refused', async () => {
  const written = [];
  const writer = new host.FrameWriter((data) => written.push(data), 1024);
  writer.add({ type: 'update', from: 'a', to: 'b', id: 1 });
  writer.add({ type: 'update', from: 'a', to: 'b', id: 2 });
  assert.throws(() => writer.add({ type: 'update', from: 'a', to: 'b', body: { pad: 'x'.repeat(2000) } }), /frame limit/);
  await flush();
  assert.equal(written.length, 1);
  assert.equal(written[0].readUInt32BE(0), written[0].length - 4);
  const batch = JSON.parse(written[0].subarray(4).toString());
  assert.deepEqual(batch.map((m) => m.id), [1, 2]);
});

test("MiniBus: '*' listeners get the stub's traffic, exact listeners win, responses go to their callback", () => {
  const sent = [];
  const bus = new host.MiniBus((msg) => sent.push(msg));
  const star = [];
  const exact = [];
  bus.addListener('*', (msg) => star.push(msg.id));
  const listener = bus.addListener('hyperty://x.test/h', (msg) => exact.push(msg.id));
  const answers = [];
  const id = bus.postMessage({ type: 'create', from: 'runtime://rt.test/r1/registry', to: 'domain://x' }, (m) => answers.push(m.body.code));
  assert.equal(sent.length, 1);
  assert.equal(sent[0].id, id);
  bus._onMessage({ id, type: 'response', from: 'domain://x', to: 'runtime://rt.test/r1/registry', body: { code: 200 } });
  bus._onMessage({ id: 7, type: 'update', from: 'a', to: 'hyperty://x.test/h' });
  bus._onMessage({ id: 8, type: 'update', from: 'a', to: 'hyperty://x.test/other' });
  listener.remove();
  bus._onMessage({ id: 9, type: 'update', from: 'a', to: 'hyperty://x.test/h' });
  assert.deepEqual(answers, [200]);
  assert.deepEqual(exact, [7]);
  assert.deepEqual(star, [8, 9]);
});

test("reTHINK's gen-2 Vert.x bundle, unmodified: created, open, in-progress, live, via on both paths, close", () => {
  const source = readFileSync(new URL('default.ps.js', DATA), 'utf8');
  const start = host.loadStub(source, { context: contextWithFakeSocket() });
  const out = [];
  const bus = new host.MiniBus((msg) => out.push(msg));
  const config = host.withDefaults({ url: 'ws://127.0.0.1:9/ws', runtimeURL: RUNTIME });
  const stub = start(STUB_URL, bus, config, host.missingFactory());
  const statuses = () => out.filter((m) => m.to === `${STUB_URL}/status`).map((m) => m.body.value);
  assert.deepEqual(statuses(), ['created']);
  const socket = FakeSocket.last;
  assert.equal(socket.url, 'ws://127.0.0.1:9/ws');
  socket.open();
  const [open] = socket.sent;
  assert.equal(open.type, 'open');
  assert.equal(open.from, RUNTIME);
  assert.equal(open.to, 'mn:/session');
  socket.receive({ id: open.id, type: 'response', from: 'mn:/session', to: RUNTIME, body: { code: 200, runtimeToken: 'tok' } });
  assert.deepEqual(statuses(), ['created', 'in-progress', 'live']);
  bus._onMessage({ id: 1, type: 'create', from: `${RUNTIME}/registry`, to: 'domain://msg-node.x.test/hyperty-address-allocation', body: {} });
  assert.equal(socket.sent[1].body.via, `${RUNTIME}/tok`);  // the default maxBuffer lets it send
  socket.receive({ id: 5, type: 'ping', from: 'hyperty://x.test/a', to: 'hyperty://x.test/b', body: {} });
  assert.equal(out.at(-1).type, 'ping');
  assert.equal(out.at(-1).body.via, `${RUNTIME}/tok`);
  stub.disconnect();
  assert.equal(socket.sent.at(-1).type, 'close');
});

test('a configuration without maxBuffer gets the documented default; one that has it keeps it', () => {
  assert.equal(host.withDefaults({}).maxBuffer, host.DEFAULT_MAX_BUFFER);
  assert.equal(host.withDefaults({ maxBuffer: 5 }).maxBuffer, 5);
});

test("reTHINK's gen-1 Vert.x package (ISO-8859-1 bytes, base64 in its catalogue object) activates", () => {
  const descriptor = JSON.parse(readFileSync(new URL('VertxProtoStub.description.json', DATA), 'utf8'));
  const bytes = Buffer.from(descriptor.sourcePackage.sourceCode, 'base64');
  assert.throws(() => new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  const start = host.loadStub(bytes.toString('latin1'), { classname: 'VertxProtoStub', context: contextWithFakeSocket() });
  const stub = start(STUB_URL, new host.MiniBus(() => {}), { url: 'ws://127.0.0.1:9/ws', runtimeURL: RUNTIME });
  assert.equal(typeof stub.connect, 'function');
  assert.equal(typeof stub.disconnect, 'function');
});

test('a stub needing createSyncher, XMLHttpRequest or WebRTC fails naming what is missing', () => {
  const syncher = 'System.register([], function (e) { return { execute: function () { e({ default: class { '
    + '_start(u, b, c, f) { this.s = f.createSyncher(u, b, c); } } }); } }; });';
  const start = host.loadStub(syncher, {});
  assert.throws(() => start(STUB_URL, new host.MiniBus(() => {}), {}, host.missingFactory()),
    /factory\.createSyncher is not available in protofly's Node sandbox/);
  for (const [name, pattern] of [['XMLHttpRequest', /XMLHttpRequest is not available/], ['RTCPeerConnection', /WebRTC/]]) {
    const source = `module.exports = function activate() { return { instance: new ${name}() }; };`;
    assert.throws(() => host.loadStub(source, {})(STUB_URL, null, {}), pattern);
  }
});

test('a bundle with dependencies or without anything to start is refused with the reason', () => {
  assert.throws(() => host.loadStub("System.register(['dep'], function () { return { execute() {} }; });", {}),
    /System.register dependencies \(dep\)/);
  assert.throws(() => host.loadStub('var x = 1;', {}), /exports nothing to start/);
});

test('the host: create answers 200 and replays the backlog; execute runs methods; unknown ones are 404', async () => {
  const frames = [];
  const exits = [];
  const h = new host.Host({ maxFrame: 1 << 20 }, (data) => frames.push(data), (code) => exits.push(code));
  const source = `module.exports = function activate(url, bus, config) {
    const instance = { seen: [], connect(c) { return { ok: c.k }; }, fail() { throw new RangeError('no'); } };
    bus.addListener('*', (m) => bus.postMessage({ type: 'response', id: m.id, from: m.to, to: m.from, body: { code: 200, n: m.body.n } }));
    return { name: 'Echo', instance };
  };`;
  const ext = 'hyperty-runtime://sandbox/external';
  h.receive({ id: 1, type: 'update', from: 'hyperty://y.test/a', to: 'hyperty://x.test/b', body: { n: 1 } });
  h.receive({ id: 1, type: 'create', from: ext, to: 'hyperty-runtime://sandbox/internal', body: { url: STUB_URL, sourceCode: source, config: {} } });
  h.receive({ id: 2, type: 'execute', from: ext, to: STUB_URL, body: { method: 'connect', params: [{ k: 3 }] } });
  h.receive({ id: 3, type: 'execute', from: ext, to: STUB_URL, body: { method: 'nope', params: [] } });
  h.receive({ id: 4, type: 'execute', from: ext, to: STUB_URL, body: { method: 'fail', params: [] } });
  await flush();
  await flush();
  const decoder = new host.FrameDecoder();
  const out = frames.flatMap((f) => decoder.feed(f));
  const answer = (id) => out.find((m) => m.to === ext && m.id === id).body;
  assert.deepEqual(answer(1), { code: 200 });
  assert.deepEqual(answer(2), { code: 200, value: { ok: 3 } });
  assert.equal(answer(3).code, 404);
  assert.deepEqual(answer(4), { code: 500, description: 'RangeError: no' });
  assert.equal(out.find((m) => m.to === 'hyperty://y.test/a').body.n, 1);  // the backlog reached the stub
  h.receive({ id: 5, type: 'delete', from: ext, to: 'hyperty-runtime://sandbox/internal', body: { url: STUB_URL } });
  assert.deepEqual(exits, [0]);
});

test('the host: a stub that cannot start is a 500 naming why, and the host stays usable', async () => {
  const frames = [];
  const h = new host.Host({}, (data) => frames.push(data), () => {});
  const ext = 'hyperty-runtime://sandbox/external';
  h.receive({ id: 1, type: 'create', from: ext, to: 'x', body: { url: STUB_URL, sourceCode: 'throw new Error("boom")', config: {} } });
  h.receive({ id: 2, type: 'create', from: ext, to: 'x', body: { url: '', sourceCode: '' } });
  await flush();
  const out = frames.flatMap((f) => new host.FrameDecoder().feed(f));
  assert.deepEqual(out.map((m) => m.body), [{ code: 500, description: 'Error: boom' }, { code: 400, description: 'create: body.url must be a non-empty string' }]);
});

// -- brokered connections (node_egress.js) ------------------------------------------------------------------

const egressModule = require('../../src/protofly/sandbox/node_egress.js');

function egressWithOutbox(channel = true) {
  const sent = [];
  return { egress: new egressModule.Egress((msg) => sent.push(msg), channel), sent };
}

function fakeSocket() {
  return { destroyed: false, noDelay: false, setNoDelay() { this.noDelay = true; }, destroy() { this.destroyed = true; } };
}

test('egress: a request completes when both the answer and the socket came, in either order', async () => {
  const { egress, sent } = egressWithOutbox();
  const first = egress.open('ws://node.x.test:80/ws');
  const second = egress.open('tcp://db.x.test:5432');
  assert.deepEqual(sent.map((m) => [m.id, m.type, m.to, m.body.method, m.body.params]), [
    [1, 'execute', 'hyperty-runtime://sandbox/external', 'open-connection', ['ws://node.x.test:80/ws']],
    [2, 'execute', 'hyperty-runtime://sandbox/external', 'open-connection', ['tcp://db.x.test:5432']],
  ]);
  const one = fakeSocket();
  const two = fakeSocket();
  assert.equal(egress.onAnswer({ id: 1, type: 'response', body: { code: 200 } }), true);
  egress.onHandle({ protofly: 'egress', id: '1' }, one);
  egress.onHandle({ protofly: 'egress', id: '2' }, two);
  egress.onAnswer({ id: 2, type: 'response', body: { code: 200 } });
  assert.equal(await first, one);
  assert.equal(await second, two);
  assert.ok(one.noDelay && !one.destroyed && egress.pending.size === 0);
});

test("egress: a refusal rejects with the runtime's code and words; no channel and too many are refused here", async () => {
  const { egress } = egressWithOutbox();
  const refused = egress.open('tcp://evil.test:25');
  egress.onAnswer({ id: 1, type: 'response', body: { code: 403, description: 'egress: tcp://evil.test:25 not declared' } });
  await assert.rejects(refused, (err) => err.name === 'EgressError' && err.code === 403 && /not declared/.test(err.message));
  await assert.rejects(egressWithOutbox(false).egress.open('ws://a.test'), (err) => err.code === 403 && /no socket channel/.test(err.message));
  const busy = egressWithOutbox().egress;
  const waiting = Array.from({ length: egressModule.MAX_OPENING }, () => busy.open('ws://a.test').catch(() => null));
  await assert.rejects(busy.open('ws://a.test'), (err) => err.code === 429);
  for (const id of busy.pending.keys()) busy.fail(id, new Error('test over'));
  await Promise.all(waiting);
});

test('egress: a socket nobody asked for, or a second one for a request, is kept bounded and closed', () => {
  const { egress } = egressWithOutbox();
  const strays = Array.from({ length: 70 }, fakeSocket);
  strays.forEach((socket, i) => egress.onHandle({ protofly: 'egress', id: String(1000 + i) }, socket));
  assert.equal(egress.unclaimed.size, 64);
  assert.deepEqual(strays.slice(0, 6).map((s) => s.destroyed), [true, true, true, true, true, true]);
  const foreign = fakeSocket();
  egress.onHandle({ something: 'else' }, foreign);
  assert.ok(foreign.destroyed);
});

test("egress: the stub's WebSocket and fetch ask the broker for the URL's endpoint", async () => {
  const { egress, sent } = egressWithOutbox();
  const context = host.stubContext({ nodeModules: null }, egress);
  const socket = new context.WebSocket('ws://node.x.test:8080/ws');
  socket.onerror = () => {};
  const fetched = context.fetch('http://api.x.test/v1').catch((err) => err);
  await flush();
  assert.deepEqual(sent.map((m) => m.body.params[0]), ['ws://node.x.test:8080/ws', 'http://api.x.test/v1']);
  egress.onAnswer({ id: 2, type: 'response', body: { code: 403, description: 'egress: http://api.x.test:80/v1 not declared' } });
  const err = await fetched;
  assert.equal(err.code, 403);
  egress.onAnswer({ id: 1, type: 'response', body: { code: 502, description: 'egress: cannot connect' } });
  const closed = await new Promise((resolve) => { socket.onclose = (event) => resolve(event.code); });
  assert.equal(closed, 1006);
});

test("egress: a wss/https connection is TLS over the brokered socket, the server's certificate checked", async (t) => {
  const { execFileSync } = require('node:child_process');
  const { mkdtempSync } = require('node:fs');
  const { tmpdir } = require('node:os');
  const path = require('node:path');
  const net = require('node:net');
  const tls = require('node:tls');
  const dir = mkdtempSync(path.join(tmpdir(), 'protofly-tls-'));
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1',
      '-subj', '/CN=node.x.test', '-addext', 'subjectAltName=DNS:node.x.test'], { stdio: 'ignore' });
  } catch (err) {
    t.skip(`openssl cannot make a test certificate (${err.message})`);
    return;
  }
  const server = tls.createServer({ key: readFileSync(key), cert: readFileSync(cert) }, (socket) => socket.end('hello over TLS'));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  // The broker's part, played by the test: a plain TCP connection to the server, as the runtime passes it.
  const broker = { asked: [], open(url) { this.asked.push(url); return new Promise((resolve) => { const s = net.connect(port, '127.0.0.1', () => resolve(s)); }); } };
  const connect = (options, host = 'node.x.test') => new Promise((resolve, reject) => {
    egressModule.connector(broker, `wss://${host}:${port}/ws`, {})(options, (err, socket) => {
      if (err) return reject(err);
      socket.on('error', reject);
      const chunks = [];
      socket.on('data', (chunk) => chunks.push(chunk));
      socket.on('end', () => resolve(Buffer.concat(chunks).toString()));
      return undefined;
    });
  });
  try {
    await assert.rejects(connect({}), (err) => err.code === 'DEPTH_ZERO_SELF_SIGNED_CERT');  // not trusted: refused
    assert.equal(await connect({ ca: readFileSync(cert) }), 'hello over TLS');  // trusted, for the URL's host
    await assert.rejects(connect({ ca: readFileSync(cert) }, 'other.x.test'), (err) => err.code === 'ERR_TLS_CERT_ALTNAME_INVALID');
    assert.deepEqual(broker.asked.slice(0, 2), [`wss://node.x.test:${port}/ws`, `wss://node.x.test:${port}/ws`]);
  } finally {
    server.close();
  }
});
