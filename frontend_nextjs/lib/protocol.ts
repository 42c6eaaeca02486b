/**
 * The server's wire protocol, "extended" version 3 (docs/protocol.md in the repository).
 *
 * Two WebSockets, both opened with `?uid=U&protocol=3`:
 * - receiver (client → server): binary int16 PCM microphone frames and JSON messages; the server answers its
 *   opening with a `ready` event that carries the session's key (lib/connection.ts tells the order);
 * - sender (server → client): JSON events and binary answer audio with an 8-byte header.
 */

export const PROTOCOL_VERSION = 3;

/** Hz. Every sample on the wire, in both directions, is 16 kHz mono int16 little-endian PCM. */
export const WIRE_SAMPLE_RATE = 16000;

/** A source's title is cut to this many characters: it is the server's (or a web page's) to choose. */
const MAX_SOURCE_TITLE = 200;

/** Bytes before the PCM in a binary audio frame: turn (uint32 LE), then seq (uint32 LE). */
const AUDIO_HEADER_BYTES = 8;

/** Per-turn timings in ms; a value is null when its stage did not run. */
export interface TurnMetrics {
  eot_wait_ms: number | null;
  asr_ms: number | null;
  llm_first_token_ms: number | null;
  /** Absent from servers older than this metric. */
  llm_first_chunk_ms?: number | null;
  tts_first_audio_ms: number | null;
  send_ms: number | null;
  first_audio_ms: number | null;
  barge_in_ms: number | null;
  interrupted: boolean;
  /** Times the answer paused for a backchannel or a noise and went on. Absent from servers older than it. */
  resumed?: number;
  /** --speculate: the answer was started at a pause, this long before the turn ended. Absent from older servers. */
  speculated?: boolean;
  speculated_ms?: number | null;
  /** --speculate: answers started at earlier pauses and dropped as the user spoke on, and the LLM requests they cost. */
  speculations_discarded?: number;
  llm_requests_discarded?: number;
  /** The turn whose question this one carried on (see the `transcript` event), or null. Absent from older servers. */
  continues?: number | null;
}

export type ServerEvent =
  | {
      event: "ready";
      uid: string;
      protocol: number;
      sample_rate: number;
      /** Only on the receiver's: what opens the sender, and resumes the session after a drop. A secret. */
      session_key?: string;
      /** On the receiver's: whether this is the session we had before a drop, which goes on. */
      resumed?: boolean;
    }
  | { event: "speech_start"; turn: number }
  | { event: "interrupt"; turn: number }
  /** The user speaks over the answer: hold its playback, keeping what is queued. */
  | { event: "pause"; turn: number }
  /** It was a backchannel (`heard`) or a sound with no words (""): play on from where playback stopped. */
  | { event: "resume"; turn: number; heard: string }
  /**
   * `continues`: the turn whose question these words carry on (the user spoke on over the start of its answer, after a
   * pause taken for the end of their turn): the server asks both as one question and forgets that turn's answer.
   * Absent from older servers.
   */
  | { event: "transcript"; turn: number; text: string; final: boolean; continues?: number | null }
  | { event: "answer"; turn: number; seq: number; text: string; end: boolean }
  | { event: "metrics"; turn: number; metrics: TurnMetrics }
  | { event: "error"; code: string; message: string; turn: number | null }
  | { event: "sources"; turn: number; sources: Source[] };

/**
 * Where an answer came from (servers that look things up before answering). Untrusted text: `url` may be a
 * web link or a document's path or name.
 */
export interface Source {
  title: string;
  url: string;
}

export type ServerEventName = ServerEvent["event"];

export type ReadyEvent = Extract<ServerEvent, { event: "ready" }>;

/** A binary frame of answer audio from the sender socket. */
export interface AnswerAudio {
  turn: number;
  seq: number; // the `answer` event this audio belongs to
  pcm: Int16Array; // 16 kHz mono
}

export type ClientMessage =
  | { type: "user_input"; uid: string; text: string }
  | { type: "playback"; turn: number; played_ms: number; playing: boolean }
  /** Sent when nothing else has been for a while, so the server does not close the receiver as idle. */
  | { type: "keepalive" };

const KNOWN_EVENTS: ReadonlySet<string> = new Set<ServerEventName>([
  "ready",
  "speech_start",
  "interrupt",
  "pause",
  "resume",
  "transcript",
  "answer",
  "metrics",
  "error",
  "sources",
]);

/**
 * Parses a JSON text frame from the sender socket (or the receiver's, for its `ready`). Returns null for
 * anything that is not a known event, so a newer server's additional events are ignored rather than
 * breaking the client.
 */
export function parseServerEvent(text: string): ServerEvent | null {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof data !== "object" || data === null) return null;
  const event = (data as { event?: unknown }).event;
  if (typeof event !== "string" || !KNOWN_EVENTS.has(event)) return null;
  const turn = (data as { turn?: unknown }).turn;
  if (event !== "ready" && event !== "error" && typeof turn !== "number") return null;
  if (event === "sources") return { event, turn: turn as number, sources: parseSources(data) };
  return data as ServerEvent;
}

/** The well-formed entries of a `sources` event, as strings; others are left out. */
function parseSources(data: object): Source[] {
  const list = (data as { sources?: unknown }).sources;
  if (!Array.isArray(list)) return [];
  const text = (value: unknown) => (typeof value === "string" ? value.trim() : "");
  return list
    .filter((item): item is { title?: unknown; url?: unknown } => typeof item === "object" && item !== null)
    .map((item) => ({ title: cut(text(item.title), MAX_SOURCE_TITLE), url: text(item.url) }))
    .filter((source) => source.title !== "" || source.url !== "");
}

function cut(text: string, length: number): string {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

/** Splits a binary frame from the sender socket into its header and int16 samples. */
export function parseAudioFrame(frame: ArrayBuffer): AnswerAudio | null {
  if (frame.byteLength < AUDIO_HEADER_BYTES || frame.byteLength % 2 !== 0) return null;
  const view = new DataView(frame);
  const pcm = new Int16Array((frame.byteLength - AUDIO_HEADER_BYTES) / 2);
  for (let i = 0; i < pcm.length; i++) {
    pcm[i] = view.getInt16(AUDIO_HEADER_BYTES + 2 * i, true);
  }
  return { turn: view.getUint32(0, true), seq: view.getUint32(4, true), pcm };
}

/** Encodes samples in [-1, 1] as the receiver's binary frame: int16 little-endian PCM. */
export function encodeMicFrame(samples: Float32Array): ArrayBuffer {
  const frame = new ArrayBuffer(samples.length * 2);
  const view = new DataView(frame);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(2 * i, Math.round(s * 32767), true);
  }
  return frame;
}

/** Voice-to-voice latency of a spoken turn: the end-of-turn wait plus end of turn → first audio sent. */
export function voiceToVoiceMs(m: TurnMetrics): number | null {
  if (m.first_audio_ms === null) return null;
  return (m.eot_wait_ms ?? 0) + m.first_audio_ms;
}
