/**
 * Answer playback on the audio thread: a queue of chunks at the AudioContext's rate, played back to back
 * so consecutive chunks join without gaps, and cut at the next render quantum (128 frames, under 3 ms)
 * when asked.
 *
 * Messages in:
 *   {type: "push", turn, samples: Float32Array}  queue audio of `turn`
 *   {type: "stop", throughTurn}                  drop all audio of turns <= throughTurn, after a short fade
 *   {type: "pause", turn}                        hold the audio of turns <= turn after a short fade, keeping it
 *   {type: "resume", turn}                       play the held audio on from the next frame, fading in
 * Messages out:
 *   {type: "started", turn, time}                  the turn's first frame is playing; audio-clock seconds
 *   {type: "progress", turn, playedFrames, playing}  every `reportFrames` while playing, and when playback stops
 */

// A cut mid-waveform clicks; fading out over a few milliseconds does not, and is still immediate to the ear.
const FADE_SECONDS = 0.008;

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.queue = []; // {turn, samples, offset}
    this.turn = -1; // the turn whose audio played last
    this.playedFrames = 0; // frames of `this.turn` played so far
    this.sinceReport = 0;
    this.playing = false;
    this.fadeLeft = 0; // frames still to fade out
    this.fadeLength = 0;
    this.fadeInLeft = 0; // frames still to fade in, after a pause
    this.pausedThrough = -1; // audio of turns up to this one is held, not played (and not dropped)
    this.reportFrames = Math.round(sampleRate * options.processorOptions.reportSeconds);
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(message) {
    if (message.type === "push") {
      this.queue.push({ turn: message.turn, samples: message.samples, offset: 0 });
    } else if (message.type === "stop") {
      this.stop(message.throughTurn);
      if (this.pausedThrough <= message.throughTurn) this.pausedThrough = -1;
    } else if (message.type === "pause") {
      this.pausedThrough = message.turn;
      if (this.playing) this.fadeLength = this.fadeLeft = Math.round(FADE_SECONDS * sampleRate);
    } else if (message.type === "resume" && message.turn === this.pausedThrough) {
      this.pausedThrough = -1;
      this.fadeLength = this.fadeInLeft = Math.round(FADE_SECONDS * sampleRate);
    }
  }

  stop(throughTurn) {
    // Keep only the next few milliseconds of the stopped turns, to fade out; drop the rest.
    let fadeFrames = Math.round(FADE_SECONDS * sampleRate);
    const kept = [];
    for (const chunk of this.queue) {
      if (chunk.turn > throughTurn) {
        kept.push(chunk);
      } else if (fadeFrames > 0 && this.playing && chunk.turn === this.turn) {
        const frames = Math.min(fadeFrames, chunk.samples.length - chunk.offset);
        const samples = chunk.samples.subarray(chunk.offset, chunk.offset + frames);
        kept.push({ turn: chunk.turn, samples, offset: 0 });
        fadeFrames -= frames;
      }
    }
    this.queue = kept;
    this.fadeLength = this.fadeLeft = Math.round(FADE_SECONDS * sampleRate) - fadeFrames;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0]; // mono; the destination spreads it over its channels
    let written = 0;
    while (written < out.length && this.queue.length > 0) {
      const chunk = this.queue[0];
      if (chunk.turn <= this.pausedThrough && this.fadeLeft === 0) break; // held: played on after a resume
      if (chunk.turn !== this.turn) {
        this.turn = chunk.turn;
        this.playedFrames = 0;
        this.port.postMessage({ type: "started", turn: chunk.turn, time: currentTime + written / sampleRate });
      }
      const frames = Math.min(out.length - written, chunk.samples.length - chunk.offset);
      for (let i = 0; i < frames; i++) {
        let gain = 1;
        if (this.fadeLeft > 0) gain = this.fadeLeft-- / this.fadeLength;
        else if (this.fadeInLeft > 0) gain = 1 - this.fadeInLeft-- / this.fadeLength;
        out[written + i] = chunk.samples[chunk.offset + i] * gain;
      }
      chunk.offset += frames;
      written += frames;
      this.playedFrames += frames;
      this.sinceReport += frames;
      if (chunk.offset === chunk.samples.length) this.queue.shift();
    }

    const playing = written > 0;
    if (playing !== this.playing || (playing && this.sinceReport >= this.reportFrames)) {
      this.playing = playing;
      this.sinceReport = 0;
      this.port.postMessage({ type: "progress", turn: this.turn, playedFrames: this.playedFrames, playing });
    }
    return true;
  }
}

registerProcessor("player-processor", PlayerProcessor);
