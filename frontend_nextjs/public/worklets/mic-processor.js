/**
 * Microphone capture on the audio thread. It mixes the input down to mono and posts it to the main thread
 * in blocks of `blockFrames` frames at the AudioContext's rate, each with the audio-clock time (seconds)
 * just after its last frame. Resampling to 16 kHz and sending happen on the main thread (lib/mic.ts).
 */
class MicProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockFrames = options.processorOptions.blockFrames;
    this.block = new Float32Array(this.blockFrames);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels.length === 0) return true; // no input connected yet
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sum = 0;
      for (const channel of channels) sum += channel[i];
      this.block[this.filled++] = sum / channels.length;
      if (this.filled === this.blockFrames) {
        // Transferred, not copied: the block now belongs to the main thread.
        const endTime = currentTime + (i + 1) / sampleRate;
        this.port.postMessage({ samples: this.block, endTime }, [this.block.buffer]);
        this.block = new Float32Array(this.blockFrames);
        this.filled = 0;
      }
    }
    return true; // keep running while the node exists
  }
}

registerProcessor("mic-processor", MicProcessor);
