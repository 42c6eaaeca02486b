// Test hooks, injected into the page before its own scripts (page.addInitScript). Nothing here is part
// of the product: it observes the page from outside through the Web APIs the page uses.
//
// - AudioContext: remembers the page's context, whose clock every timestamp below is read from.
// - AudioNode.prototype.connect: whatever the page connects to the speakers also feeds a tap worklet,
//   which reports the peak level of every render quantum (128 frames) with its audio-clock start time.
// - WebSocket: notes each socket the page opens (its URL and the subprotocols it offers), each server event
//   (from either socket: the receiver's `ready`, which carries the session key, too) and audio frame on
//   arrival, each JSON message the page sends and each close (code and reason), with the audio clock's
//   time, and counts the microphone frames it sends (and their peak level).
//   window.__s2sTestDropSockets() closes the page's sockets, as a network failure would.
(() => {
  const record = {
    quanta: [], events: [], audio: [], sent: [], sockets: [], closes: [], micFrames: 0, micPeak: 0, sampleRate: null,
  };
  window.__s2sTest = record;
  let context = null;
  const now = () => (context ? context.currentTime : null);

  const tapSource = `
    class S2sTestTap extends AudioWorkletProcessor {
      constructor() { super(); this.batch = []; }
      process(inputs) {
        let peak = 0;
        for (const channel of inputs[0]) for (const v of channel) peak = Math.max(peak, Math.abs(v));
        this.batch.push(currentTime, peak);
        if (this.batch.length >= 64) { this.port.postMessage(this.batch); this.batch = []; }
        return true;
      }
    }
    registerProcessor("s2s-test-tap", S2sTestTap);`;
  const tapUrl = URL.createObjectURL(new Blob([tapSource], { type: "application/javascript" }));
  const addModule = AudioWorklet.prototype.addModule;
  const tapLoaded = new WeakMap(); // AudioWorklet -> promise of the tap module
  const taps = new WeakMap(); // AudioContext -> tap node

  window.AudioContext = class extends window.AudioContext {
    constructor(options) {
      super(options);
      context = this;
      record.sampleRate = this.sampleRate;
      tapLoaded.set(this.audioWorklet, addModule.call(this.audioWorklet, tapUrl));
    }
  };
  // The page's worklets are ready only once the tap is too, so the tap exists before the page connects.
  AudioWorklet.prototype.addModule = function (url, options) {
    return Promise.all([addModule.call(this, url, options), tapLoaded.get(this)]).then(() => undefined);
  };

  const connect = AudioNode.prototype.connect;
  AudioNode.prototype.connect = function (destination, ...rest) {
    if (destination instanceof AudioDestinationNode) {
      let tap = taps.get(this.context);
      if (!tap) {
        tap = new AudioWorkletNode(this.context, "s2s-test-tap");
        tap.port.onmessage = ({ data }) => {
          for (let i = 0; i < data.length; i += 2) record.quanta.push([data[i], data[i + 1]]);
        };
        connect.call(tap, destination); // the tap outputs silence; connected so that it is pulled
        taps.set(this.context, tap);
      }
      connect.call(this, tap);
    }
    return connect.call(this, destination, ...rest);
  };

  const sockets = [];
  window.__s2sTestDropSockets = () => sockets.splice(0).forEach((socket) => socket.close());

  window.WebSocket = class extends window.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
      record.sockets.push({ url: String(url), protocols: [protocols ?? []].flat(), t: now() });
      this.addEventListener("close", ({ code, reason }) => record.closes.push({ code, reason, t: now() }));
      // Registered before the page sets onmessage, so it runs first.
      this.addEventListener("message", ({ data }) => {
        if (typeof data === "string") {
          const message = JSON.parse(data);
          if (message.event) record.events.push({ ...message, t: now() }); // not the receiver's placeholders
        } else if (data instanceof ArrayBuffer && data.byteLength >= 8) {
          const view = new DataView(data);
          record.audio.push({ turn: view.getUint32(0, true), samples: (data.byteLength - 8) / 2, t: now() });
        }
      });
    }

    send(data) {
      if (typeof data === "string") {
        record.sent.push({ ...JSON.parse(data), t: now() });
      } else {
        record.micFrames += 1;
        for (const v of new Int16Array(data)) record.micPeak = Math.max(record.micPeak, Math.abs(v) / 32768);
      }
      return super.send(data);
    }
  };
})();
