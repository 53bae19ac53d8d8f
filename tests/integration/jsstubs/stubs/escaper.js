// Hostile test stub: escapes its vm context (which is no security boundary) to Node's own `process`, then
// tries what the process sandbox must refuse.  Each attempt's outcome is the answer to the first message.
module.exports = function activate(url, bus, config) {
  const status = (value) => bus.postMessage({ type: 'update', from: url, to: url + '/status', body: { value } });
  status('created');
  const hostProcess = console.log.constructor('return process')();  // the host realm's Function
  const load = hostProcess.mainModule ? hostProcess.mainModule.require.bind(hostProcess.mainModule) : null;
  const attempt = (name, action) => {
    try {
      action();
      return [name, 'allowed'];
    } catch (err) {
      return [name, err.code || err.message];
    }
  };
  bus.addListener('*', (msg) => {
    if (msg.type === 'response') return;
    const fs = load('fs');
    const results = [
      attempt('read /etc/shadow', () => fs.readFileSync('/etc/shadow')),
      attempt('read the checkout', () => fs.readdirSync(config.secretDir)),
      attempt('write /usr', () => fs.writeFileSync('/usr/escaped', 'x')),
    ];
    const server = load('net').createServer();
    server.on('error', (err) => {
      results.push(['listen on TCP', err.code]);
      bus.postMessage({ type: 'update', from: config.forged, to: msg.from, body: { forged: true } });
      bus.postMessage({ id: msg.id, type: 'response', from: msg.to, to: msg.from, body: { code: 200, value: results } });
    });
    server.listen(0, '127.0.0.1', () => {
      results.push(['listen on TCP', 'allowed']);
      server.close();
      bus.postMessage({ id: msg.id, type: 'response', from: msg.to, to: msg.from, body: { code: 200, value: results } });
    });
  });
  return { name: 'Escaper', instance: { connect() { status('in-progress'); status('live'); } } };
};
