/**
 * The two WebSockets to the server, reopened with exponential backoff whenever either one closes.
 *
 * The sender socket (server → client) opens first and the receiver (client → server) only after its
 * `ready` event, so no event of the session can be sent before we listen. Both carry the same uid on
 * every attempt. The server ends a session when its receiver socket closes, so each reconnection starts a
 * new session on the server (turns count from 1 again); it refuses a uid whose old receiver it has not
 * noticed closing yet (close code 1008), which the next attempt fixes.
 */
import {
  parseAudioFrame,
  parseServerEvent,
  type AnswerAudio,
  type ClientMessage,
  type ServerEvent,
} from "./protocol";

export type ConnectionState =
  | { phase: "connecting"; attempt: number }
  | { phase: "connected" }
  | { phase: "waiting"; reason: string; retryInMs: number }
  | { phase: "closed" };

export interface ConnectionEvents {
  onState(state: ConnectionState): void;
  onEvent(event: ServerEvent): void;
  onAudio(audio: AnswerAudio): void;
}

export interface ServerUrls {
  receiverUrl: string;
  senderUrl: string;
}

const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;
/** Microphone frames are dropped, not queued, when this much is still unsent (about 2 s of audio). */
const MAX_BUFFERED_BYTES = 64_000;

export class AgentConnection {
  private sender: WebSocket | null = null;
  private receiver: WebSocket | null = null;
  private failures = 0; // consecutive attempts that did not get connected
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private closed = false;

  constructor(
    private readonly urls: ServerUrls,
    private readonly uid: string,
    private readonly events: ConnectionEvents,
  ) {}

  open(): void {
    this.closed = false;
    this.connect();
  }

  close(): void {
    this.closed = true;
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.dropSockets();
    this.events.onState({ phase: "closed" });
  }

  /** Sends a microphone frame (int16 PCM, 16 kHz mono); dropped while not connected or backed up. */
  sendAudio(frame: ArrayBuffer): void {
    const receiver = this.openReceiverSocket();
    if (receiver !== null && receiver.bufferedAmount < MAX_BUFFERED_BYTES) receiver.send(frame);
  }

  /** Returns false when not connected (the message is not sent). */
  send(message: ClientMessage): boolean {
    const receiver = this.openReceiverSocket();
    receiver?.send(JSON.stringify(message));
    return receiver !== null;
  }

  private openReceiverSocket(): WebSocket | null {
    return this.receiver?.readyState === WebSocket.OPEN ? this.receiver : null;
  }

  private connect(): void {
    this.retryTimer = null;
    this.events.onState({ phase: "connecting", attempt: this.failures + 1 });
    const sender = this.openSocket(this.urls.senderUrl);
    if (sender === null) return;
    this.sender = sender;
    sender.onmessage = ({ data }: MessageEvent<string | ArrayBuffer>) => {
      if (typeof data !== "string") {
        const audio = parseAudioFrame(data);
        if (audio !== null) this.events.onAudio(audio);
        return;
      }
      const event = parseServerEvent(data);
      if (event === null) return;
      if (event.event === "ready" && this.receiver === null) this.openReceiver();
      this.events.onEvent(event);
    };
  }

  private openReceiver(): void {
    const receiver = this.openSocket(this.urls.receiverUrl);
    if (receiver === null) return;
    this.receiver = receiver;
    // Its only messages are the placeholder replies the server sends to JSON messages for CleanS2S's
    // client: nothing to read.
    receiver.onopen = () => {
      this.failures = 0;
      this.events.onState({ phase: "connected" });
    };
  }

  private openSocket(base: string): WebSocket | null {
    let socket: WebSocket;
    try {
      const url = new URL(base);
      url.searchParams.set("uid", this.uid);
      socket = new WebSocket(url);
    } catch {
      this.retryLater(`bad server address: ${base}`);
      return null;
    }
    socket.binaryType = "arraybuffer";
    // An error is always followed by a close, which carries the reason.
    socket.onclose = (event) => this.retryLater(describeClose(event));
    return socket;
  }

  private retryLater(reason: string): void {
    if (this.closed || this.retryTimer !== null) return;
    this.dropSockets();
    const delay = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** this.failures);
    // Jitter, so clients that lost the same server do not all come back in the same instant.
    const retryInMs = Math.round(delay * (0.75 + Math.random() / 4));
    this.failures += 1;
    this.events.onState({ phase: "waiting", reason, retryInMs });
    this.retryTimer = setTimeout(() => this.connect(), retryInMs);
  }

  private dropSockets(): void {
    for (const socket of [this.sender, this.receiver]) {
      if (socket === null) continue;
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
    }
    this.sender = this.receiver = null;
  }
}

function describeClose(event: CloseEvent): string {
  if (event.code === 1008) return "the server still holds this session; retrying";
  if (event.code === 1013) return event.reason || "the server is full";
  if (event.reason) return event.reason;
  return event.wasClean ? "the server closed the connection" : "cannot reach the server";
}
