// Test stub (gen-1 form, module.exports = activate): live on connect, then on its first message it does
// what its configuration's `mode` says: `echo` answers, `crash` throws from a timer, `loop` spins forever,
// `allocate` allocates without bound.  Containment tests deploy it through the full runtime path.
module.exports = function activate(url, bus, config) {
  const status = (value) => bus.postMessage({ type: 'update', from: url, to: url + '/status', body: { value } });
  status('created');
  bus.addListener('*', (msg) => {
    if (config.mode === 'crash') {
      setTimeout(() => { throw new Error('stub crashed on purpose'); });
    } else if (config.mode === 'loop') {
      for (;;) { /* spin */ }
    } else if (config.mode === 'allocate') {
      const hoard = [];
      for (;;) hoard.push(new Array(1 << 20).fill(hoard.length));
    } else if (msg.type !== 'response') {
      bus.postMessage({ id: msg.id, type: 'response', from: msg.to, to: msg.from, body: { code: 200, value: msg.body } });
    }
  });
  return {
    name: 'Hostile',
    instance: {
      connect() { status('in-progress'); status('live'); },
      disconnect() { status('disconnected'); },
    },
  };
};
