// Hostile test stub: tries the network through its globals (WebSocket, fetch: brokered by the runtime) and,
// escaping its vm context to Node's own modules, by itself (net, dgram, /proc/net, a raw socket from a
// child process).  The first message's body says what to try; the answer lists each outcome.
module.exports = function activate(url, bus, config) {
  const status = (value) => bus.postMessage({ type: 'update', from: url, to: url + '/status', body: { value } });
  status('created');
  const hostProcess = console.log.constructor('return process')();  // the host realm's Function
  const load = hostProcess.mainModule.require.bind(hostProcess.mainModule);
  const failure = (err) => {
    if (err && err.name === 'EgressError') return `EgressError ${err.code}: ${err.message}`;
    return `${(err && (err.code || err.name)) || 'Error'}: ${err && err.message}`;
  };

  const viaWebSocket = (target) => new Promise((resolve) => {
    const socket = new WebSocket(target);
    socket.onopen = () => {
      socket.close();
      resolve('opened');
    };
    socket.onerror = (event) => resolve(failure(event.error || event));
  });

  const viaFetch = (target) => fetch(target).then(
    async (answer) => `HTTP ${answer.status} ${(await answer.text()).length} bytes`,
    failure,
  );

  const byItself = ([host, port]) => new Promise((resolve) => {
    const socket = load('net').connect({ host, port });
    socket.setTimeout(3000, () => socket.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })));
    socket.on('connect', () => {
      socket.destroy();
      resolve('connected');
    });
    socket.on('error', (err) => resolve(failure(err)));
  });

  const udp = ([host, port]) => new Promise((resolve) => {
    let socket;
    const finish = (outcome) => {
      clearTimeout(timer);
      try { socket.close(); } catch (err) { /* closed already */ }
      resolve(outcome);
    };
    const timer = setTimeout(() => finish('no outcome within 3 s'), 3000);
    try {
      socket = load('dgram').createSocket('udp4');
      socket.on('error', (err) => finish(failure(err)));
      socket.send('escaped', port, host, (err) => finish(err ? failure(err) : 'sent'));
    } catch (err) {
      finish(failure(err));
    }
  });

  const raw = (python) => {
    const script = 'import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n'
      + '    print("allowed")\nexcept OSError as e:\n    print(type(e).__name__)';
    const done = load('child_process').spawnSync(python, ['-I', '-c', script], { encoding: 'utf8', timeout: 10000 });
    return done.error ? failure(done.error) : (done.stdout.trim() || done.stderr.trim());
  };

  bus.addListener('*', async (msg) => {
    if (msg.type === 'response') return;
    const ask = msg.body || {};
    const value = {
      ws: await Promise.all((ask.ws || []).map(viaWebSocket)),
      fetch: await Promise.all((ask.fetch || []).map(viaFetch)),
      tcp: await Promise.all((ask.tcp || []).map(byItself)),
      udp: await Promise.all((ask.udp || []).map(udp)),
      proc: Object.fromEntries((ask.proc || []).map((p) => [p, load('fs').readFileSync(p, 'utf8')])),
      raw: ask.raw ? raw(ask.raw) : null,
    };
    bus.postMessage({ id: msg.id, type: 'response', from: msg.to, to: msg.from, body: { code: 200, value } });
  });
  return { name: 'NetProbe', instance: { connect() { status('in-progress'); status('live'); } } };
};
