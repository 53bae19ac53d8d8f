// Test stub in reTHINK's gen-2 form: an interworking stub that needs reTHINK's runtime services at start.
System.register([], function (e) {
  return {
    execute: function () {
      e({
        default: class {
          _start(url, bus, config, factory) {
            this._syncher = factory.createSyncher(url, bus, config);
          }
        },
      });
    },
  };
});
