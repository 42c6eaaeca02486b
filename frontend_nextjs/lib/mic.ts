/**
 * Microphone capture: getUserMedia → AudioWorklet (public/worklets/mic-processor.js) → resampled to 16 kHz
 * mono → frames of FRAME_SAMPLES for the receiver socket.
 */
import { Resampler } from "./resampler";
import { WIRE_SAMPLE_RATE } from "./protocol";

/** Samples per frame sent: 512 at 16 kHz is 32 ms, one window of the server's Silero VAD. */
export const FRAME_SAMPLES = 512;
/** The worklet posts this much audio at a time, in seconds: short, for a lively level meter. */
const BLOCK_SECONDS = 0.02;

export interface MicOptions {
  echoCancellation: boolean;
  noiseSuppression: boolean;
  autoGainControl: boolean;
}

export interface MicEvents {
  /** 32 ms of 16 kHz mono audio, samples in [-1, 1]. */
  onFrame(samples: Float32Array): void;
  /** RMS level of the last block (linear, 0 to 1), and the audio-clock time (s) at its end. */
  onLevel(rms: number, endTime: number): void;
}

export class MicError extends Error {}

export class Microphone {
  private readonly stream: MediaStream;
  private readonly source: MediaStreamAudioSourceNode;
  private readonly node: AudioWorkletNode;
  private readonly resampler: Resampler;
  private readonly frame = new Float32Array(FRAME_SAMPLES);
  private filled = 0;

  private constructor(context: AudioContext, stream: MediaStream, events: MicEvents) {
    this.stream = stream;
    this.resampler = new Resampler(context.sampleRate, WIRE_SAMPLE_RATE);
    this.source = context.createMediaStreamSource(stream);
    this.node = new AudioWorkletNode(context, "mic-processor", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { blockFrames: Math.round(context.sampleRate * BLOCK_SECONDS) },
    });
    this.node.port.onmessage = ({ data }: MessageEvent<{ samples: Float32Array; endTime: number }>) => {
      events.onLevel(rms(data.samples), data.endTime);
      this.collect(this.resampler.process(data.samples), events);
    };
    this.source.connect(this.node);
    // The node outputs silence; connecting it keeps the graph pulling it in every browser.
    this.node.connect(context.destination);
  }

  /** Asks for the microphone (the browser may prompt) and starts capturing. */
  static async open(context: AudioContext, options: MicOptions, events: MicEvents): Promise<Microphone> {
    if (!navigator.mediaDevices?.getUserMedia) {
      // Browsers offer the microphone only to secure pages: https://, or http://localhost.
      throw new MicError("The microphone needs a secure page: open it over https:// or on localhost.");
    }
    let stream: MediaStream;
    try {
      const { echoCancellation, noiseSuppression, autoGainControl } = options;
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation, noiseSuppression, autoGainControl },
      });
    } catch (error) {
      const name = error instanceof DOMException ? error.name : "";
      if (name === "NotAllowedError") throw new MicError("Microphone access was denied.");
      if (name === "NotFoundError") throw new MicError("No microphone found.");
      throw new MicError(`The microphone could not be opened: ${String(error)}`);
    }
    return new Microphone(context, stream, events);
  }

  close(): void {
    this.node.port.onmessage = null;
    this.source.disconnect();
    this.node.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
  }

  private collect(samples: Float32Array, events: MicEvents): void {
    let read = 0;
    while (read < samples.length) {
      const n = Math.min(FRAME_SAMPLES - this.filled, samples.length - read);
      this.frame.set(samples.subarray(read, read + n), this.filled);
      this.filled += n;
      read += n;
      if (this.filled === FRAME_SAMPLES) {
        events.onFrame(this.frame.slice());
        this.filled = 0;
      }
    }
  }
}

function rms(samples: Float32Array): number {
  let sum = 0;
  for (const s of samples) sum += s * s;
  return Math.sqrt(sum / samples.length);
}
