/**
 * Plays the answer audio as it streams in, and stops it at once on barge-in.
 *
 * The samples go to an AudioWorklet (public/worklets/player-processor.js) that plays a queue back to back,
 * so chunks join without gaps however they arrive, and that drops the queue at the next render quantum
 * when told to stop. Each turn's audio is resampled from 16 kHz to the AudioContext's rate as one stream,
 * so the filter runs across chunk boundaries too. (The filter's delay keeps the last millisecond of an
 * answer back; answers end in silence, so nothing audible is lost.)
 */
import { Resampler } from "./resampler";
import { WIRE_SAMPLE_RATE } from "./protocol";

/** How often the worklet reports how much it has played, in seconds. */
const REPORT_SECONDS = 0.2;

/** What the player worklet posts (public/worklets/player-processor.js). */
type WorkletMessage =
  | { type: "started"; turn: number; time: number }
  | { type: "progress"; turn: number; playedFrames: number; playing: boolean };

export interface PlayerEvents {
  /** `turn`'s first sample starts playing at `time` (AudioContext clock, seconds). */
  onStarted(turn: number, time: number): void;
  /** `playedMs` of `turn` have played; `playing` is false when playback stopped or ran out of audio. */
  onProgress(turn: number, playedMs: number, playing: boolean): void;
}

export class Player {
  private readonly node: AudioWorkletNode;
  private readonly sampleRate: number;
  private resampler: Resampler | null = null;
  private resamplerTurn = -1;

  /** Needs the player-processor module loaded in the context (see loadWorklets in lib/audio.ts). */
  constructor(context: AudioContext, events: PlayerEvents) {
    this.sampleRate = context.sampleRate;
    this.node = new AudioWorkletNode(context, "player-processor", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { reportSeconds: REPORT_SECONDS },
    });
    this.node.port.onmessage = ({ data }: MessageEvent<WorkletMessage>) => {
      if (data.type === "started") {
        events.onStarted(data.turn, data.time);
      } else if (data.type === "progress") {
        events.onProgress(data.turn, (data.playedFrames / this.sampleRate) * 1000, data.playing);
      }
    };
    this.node.connect(context.destination);
  }

  /** Queues answer audio of `turn` (int16 PCM, 16 kHz mono) after what is already queued. */
  play(turn: number, pcm: Int16Array): void {
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    this.push(turn, this.resamplerFor(turn).process(samples));
  }

  /** Holds the audio of `turn` (and older) now, keeping it: resume() plays on from the next frame. */
  pause(turn: number): void {
    this.node.port.postMessage({ type: "pause", turn });
  }

  resume(turn: number): void {
    this.node.port.postMessage({ type: "resume", turn });
  }

  /** Stops the audio of every turn up to and including `throughTurn`, now. */
  stop(throughTurn: number): void {
    this.node.port.postMessage({ type: "stop", throughTurn });
    if (this.resamplerTurn <= throughTurn) this.resampler = null;
  }

  close(): void {
    this.node.port.onmessage = null;
    this.node.disconnect();
  }

  private resamplerFor(turn: number): Resampler {
    if (this.resampler === null || this.resamplerTurn !== turn) {
      this.resampler = new Resampler(WIRE_SAMPLE_RATE, this.sampleRate);
      this.resamplerTurn = turn;
    }
    return this.resampler;
  }

  private push(turn: number, samples: Float32Array): void {
    if (samples.length > 0) this.node.port.postMessage({ type: "push", turn, samples }, [samples.buffer]);
  }
}
