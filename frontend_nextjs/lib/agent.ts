/**
 * One voice conversation: the microphone streams to the server, the server's events go to the view, and
 * the answer audio plays until the user cuts in. Independent of React; lib/useVoiceAgent.ts wraps it.
 */
import { AgentConnection, type ConnectionState, type ServerTarget } from "./connection";
import { Microphone, type MicOptions } from "./mic";
import { Player } from "./player";
import { PROTOCOL_VERSION, encodeMicFrame, type AnswerAudio, type ServerEvent } from "./protocol";

/**
 * RMS level (linear, full scale 1) above which a microphone block counts as the user's voice, for the
 * client-side latency figure only; the server's VAD decides turns. About -40 dBFS: above a quiet room after
 * noise suppression, below speech.
 */
const VOICE_RMS = 0.01;

export interface AgentEvents {
  onServerEvent(event: ServerEvent): void;
  onConnection(state: ConnectionState): void;
  /** The user stopped speaking → the answer's first sample played, in ms, measured on the audio clock. */
  onClientLatency(turn: number, ms: number): void;
  /** An answer was cut off: its first `chars` characters were heard (their audio had started playing). */
  onHeard(turn: number, chars: number): void;
  /** Something to show the user briefly. */
  onNotice(message: string): void;
}

export class VoiceAgent {
  /** Microphone level of the last block (RMS, 0 to 1), for the level meter. */
  level = 0;
  muted = false;
  private connection: AgentConnection;
  private mic: Microphone | null = null;
  private player: Player | null = null;
  /** The newest turn the server has told us of. */
  private latestTurn = 0;
  /** Audio of turns up to this one is stale (interrupted, or followed by a newer turn) and never plays. */
  private stoppedThrough = 0;
  private closed = false;
  /** Audio-clock time (s) of the last microphone block loud enough to be the user's voice. */
  private lastVoiceTime: number | null = null;
  /** Per spoken turn: when the user stopped speaking, in audio-clock seconds. */
  private readonly speechEnds = new Map<number, number>();
  /** Per turn: each answer chunk's length in characters, and where its audio starts in the turn's audio (ms). */
  private readonly chunks = new Map<number, { startMs: number; chars: number }[]>();
  /** Per turn: answer audio received, and played, in ms. */
  private readonly receivedMs = new Map<number, number>();
  private readonly playedMs = new Map<number, number>();

  /** `context` must have the worklets loaded (lib/audio.ts). */
  constructor(
    private readonly context: AudioContext,
    target: ServerTarget,
    private readonly uid: string,
    private readonly events: AgentEvents,
  ) {
    this.connection = this.newConnection(target);
  }

  connect(): void {
    this.connection.open();
  }

  /**
   * Moves to other server addresses or another token; the audio keeps running, and so does the conversation
   * when the server is the same (the new connection resumes the session with its key).
   */
  reconnect(target: ServerTarget): void {
    const key = this.connection.key;
    this.connection.close();
    this.connection = this.newConnection(target, key);
    this.connection.open();
  }

  /** Opens the microphone, or reopens it with new options; throws MicError with a message for the user. */
  async openMic(options: MicOptions): Promise<void> {
    this.mic?.close();
    this.mic = null;
    const mic = await Microphone.open(this.context, options, {
      onFrame: (samples) => {
        if (!this.muted) this.connection.sendAudio(encodeMicFrame(samples));
      },
      onLevel: (rms, endTime) => {
        this.level = this.muted ? 0 : rms;
        if (this.level > VOICE_RMS) this.lastVoiceTime = endTime;
      },
    });
    if (this.closed) {
      mic.close(); // stopped while the browser asked for permission
    } else {
      this.mic = mic;
    }
  }

  /** Sends typed text; returns false when not connected. */
  sendText(text: string): boolean {
    const sent = this.connection.send({ type: "user_input", uid: this.uid, text });
    // The server starts a new turn for it, which makes the answer now playing stale: stop it already.
    if (sent) this.stopThrough(this.latestTurn);
    return sent;
  }

  close(): void {
    this.closed = true;
    this.connection.close();
    this.mic?.close();
    this.player?.close();
    void this.context.close();
  }

  private newConnection(target: ServerTarget, sessionKey: string | null = null): AgentConnection {
    return new AgentConnection(
      target,
      this.uid,
      {
        onState: (state) => this.events.onConnection(state),
        onEvent: (event) => this.onServerEvent(event),
        onAudio: (audio) => this.onAudio(audio),
      },
      sessionKey,
    );
  }

  private onServerEvent(event: ServerEvent): void {
    switch (event.event) {
      case "ready":
        if (event.protocol !== PROTOCOL_VERSION) {
          this.events.onNotice(`The server speaks protocol ${event.protocol}; this page speaks ${PROTOCOL_VERSION}.`);
        }
        if (event.resumed === true) {
          // The session goes on (its turns count on), but the server cut off the answer under way when the
          // connection dropped: what is left of it would not match what the server kept.
          this.stopThrough(this.latestTurn);
        } else {
          this.startSession();
        }
        break;
      case "speech_start":
        // The user speaks: a new turn, which silences every older answer. Their voice from here on
        // tells when they stop speaking.
        this.seeTurn(event.turn);
        this.lastVoiceTime = null;
        break;
      case "interrupt":
        this.stopThrough(event.turn);
        this.events.onHeard(event.turn, this.heardChars(event.turn));
        break;
      case "pause":
        // The user speaks over the answer: hold it, until the server knows whether that was a backchannel.
        this.player?.pause(event.turn);
        break;
      case "resume":
        this.player?.resume(event.turn);
        break;
      case "transcript":
        this.seeTurn(event.turn);
        if (event.final && this.lastVoiceTime !== null) this.speechEnds.set(event.turn, this.lastVoiceTime);
        break;
      case "answer": {
        this.seeTurn(event.turn);
        const chunks = this.chunks.get(event.turn) ?? [];
        chunks.push({ startMs: this.receivedMs.get(event.turn) ?? 0, chars: event.text.length });
        this.chunks.set(event.turn, chunks);
        break;
      }
    }
    this.events.onServerEvent(event);
  }

  private onAudio(audio: AnswerAudio): void {
    if (audio.turn <= this.stoppedThrough) return; // late frames of a stopped turn
    this.seeTurn(audio.turn);
    this.receivedMs.set(audio.turn, (this.receivedMs.get(audio.turn) ?? 0) + audio.pcm.length / 16); // 16 kHz
    this.player?.play(audio.turn, audio.pcm);
  }

  /** As the server keeps it in the history: the chunks whose audio had started playing. */
  private heardChars(turn: number): number {
    const played = this.playedMs.get(turn);
    if (played === undefined) return 0;
    return (this.chunks.get(turn) ?? []).filter((c) => c.startMs <= played).reduce((n, c) => n + c.chars, 0);
  }

  /** A new turn makes the audio of every older one stale. */
  private seeTurn(turn: number): void {
    if (turn > this.latestTurn) {
      this.stopThrough(turn - 1);
      this.latestTurn = turn;
    }
  }

  private stopThrough(turn: number): void {
    if (turn > this.stoppedThrough) {
      this.stoppedThrough = turn;
      this.player?.stop(turn);
    }
  }

  /** A new server session (the first, or one that replaces a session lost): turns count from 1 again. */
  private startSession(): void {
    if (this.player !== null) {
      this.events.onNotice("A new conversation started on the server: the agent does not remember the earlier one.");
    }
    this.player?.close();
    this.latestTurn = this.stoppedThrough = 0;
    this.speechEnds.clear();
    this.chunks.clear();
    this.receivedMs.clear();
    this.playedMs.clear();
    this.player = new Player(this.context, {
      onStarted: (turn, time) => {
        const speechEnd = this.speechEnds.get(turn);
        if (speechEnd !== undefined) this.events.onClientLatency(turn, Math.round((time - speechEnd) * 1000));
      },
      // Tells the server how much the user heard, so its history keeps only that after a barge-in.
      onProgress: (turn, playedMs, playing) => {
        this.playedMs.set(turn, playedMs);
        this.connection.send({ type: "playback", turn, played_ms: Math.round(playedMs), playing });
      },
    });
  }
}
