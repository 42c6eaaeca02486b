/**
 * The two WebSockets to the server, reopened with exponential backoff whenever either one closes.
 *
 * The sender socket (server → client) opens first and the receiver (client → server) only after its
 * `ready` event, so no event of the session can be sent before we listen. Both carry the same uid on
 * every attempt. The server ends a session when its receiver socket closes, so each reconnection starts a
 * new session on the server (turns count from 1 again); it refuses a uid whose old receiver it has not
 * noticed closing yet (close code 1008), which the next attempt fixes.
 *
 * Some closes are final: a wrong or missing token (4401), a page origin the server does not allow (4403),
 * any other policy refusal (1008). Then it stops, in the "refused" state, until it is replaced by a new
 * connection with other settings. An idle receiver closed by the server (4408) reconnects at once.
 */
import { checkToken } from "./config";
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
  /** Refused for good: `message` says what to do, `reason` is the server's own (may be empty). */
  | { phase: "refused"; message: string; reason: string }
  | { phase: "closed" };

export interface ConnectionEvents {
  onState(state: ConnectionState): void;
  onEvent(event: ServerEvent): void;
  onAudio(audio: AnswerAudio): void;
}

export interface ServerTarget {
  receiverUrl: string;
  senderUrl: string;
  /** The server's shared token (--auth_token), offered as the subprotocol `s2s.token.<token>`; empty: none. */
  token: string;
}

/** The subprotocol the server selects; offered only with a token, which rides in the second one. */
const SUBPROTOCOL = "s2s";
const TOKEN_SUBPROTOCOL_PREFIX = "s2s.token.";
/** After this long without a message to the receiver (muted, no microphone), a keepalive goes out. */
const KEEPALIVE_MS = 30_000;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;
/** Microphone frames are dropped, not queued, when this much is still unsent (about 2 s of audio). */
const MAX_BUFFERED_BYTES = 64_000;

export class AgentConnection {
  private sender: WebSocket | null = null;
  private receiver: WebSocket | null = null;
  private failures = 0; // consecutive attempts that did not get connected
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private keepaliveTimer: ReturnType<typeof setTimeout> | null = null;
  /** performance.now() of the last message sent to the receiver. */
  private lastSentAt = 0;
  private closed = false;

  constructor(
    private readonly target: ServerTarget,
    private readonly uid: string,
    private readonly events: ConnectionEvents,
  ) {}

  open(): void {
    this.closed = false;
    if (!checkToken(this.target.token)) {
      this.refuse("The token has characters a token cannot have: set it again in Settings.", "");
      return;
    }
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
    if (receiver !== null && receiver.bufferedAmount < MAX_BUFFERED_BYTES) {
      receiver.send(frame);
      this.lastSentAt = performance.now();
    }
  }

  /** Returns false when not connected (the message is not sent). */
  send(message: ClientMessage): boolean {
    const receiver = this.openReceiverSocket();
    if (receiver === null) return false;
    receiver.send(JSON.stringify(message));
    this.lastSentAt = performance.now();
    return true;
  }

  private openReceiverSocket(): WebSocket | null {
    return this.receiver?.readyState === WebSocket.OPEN ? this.receiver : null;
  }

  private connect(): void {
    this.retryTimer = null;
    this.events.onState({ phase: "connecting", attempt: this.failures + 1 });
    const sender = this.openSocket(this.target.senderUrl);
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
    const receiver = this.openSocket(this.target.receiverUrl);
    if (receiver === null) return;
    this.receiver = receiver;
    // Its only messages are the placeholder replies the server sends to JSON messages for CleanS2S's
    // client: nothing to read.
    receiver.onopen = () => {
      this.failures = 0;
      this.lastSentAt = performance.now();
      this.scheduleKeepalive();
      this.events.onState({ phase: "connected" });
    };
  }

  /** The server closes a receiver that has sent nothing for a while: a keepalive when nothing else went out. */
  private scheduleKeepalive(): void {
    const due = this.lastSentAt + KEEPALIVE_MS - performance.now();
    this.keepaliveTimer = setTimeout(
      () => {
        this.keepaliveTimer = null;
        if (performance.now() - this.lastSentAt >= KEEPALIVE_MS) this.send({ type: "keepalive" });
        if (this.openReceiverSocket() !== null) this.scheduleKeepalive();
      },
      Math.max(0, due),
    );
  }

  private openSocket(base: string): WebSocket | null {
    let socket: WebSocket;
    try {
      const url = new URL(base);
      url.searchParams.set("uid", this.uid);
      // The token goes in a subprotocol, not in the URL, which proxies and servers write to their logs.
      const { token } = this.target;
      socket = new WebSocket(url, token ? [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token] : []);
    } catch {
      this.retryLater(`bad server address: ${base}`);
      return null;
    }
    socket.binaryType = "arraybuffer";
    // An error is always followed by a close, which carries the reason.
    socket.onclose = (event) => this.onClose(event);
    return socket;
  }

  private onClose(event: CloseEvent): void {
    const reason = event.reason;
    switch (event.code) {
      case CLOSE_UNAUTHORIZED:
        this.refuse(
          this.target.token
            ? "The server refused the token: set the right one in Settings."
            : "The server needs a token: set it in Settings, or open the page with ?token=… in its address.",
          reason,
        );
        return;
      case CLOSE_FORBIDDEN_ORIGIN:
        this.refuse("The server does not accept connections from this page's address (its origin).", reason);
        return;
      case CLOSE_POLICY:
        // A uid still held: the server has not noticed our previous receiver closing yet. Anything else is final.
        if (UID_IN_USE.test(reason)) break;
        this.refuse("The server refused the connection.", reason);
        return;
      case CLOSE_IDLE:
        // Nothing was sent for too long (the browser held back our timers, say): come back without a fuss.
        if (this.closed || this.retryTimer !== null) return;
        this.dropSockets();
        this.connect();
        return;
    }
    this.retryLater(describeClose(event));
  }

  private refuse(message: string, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.dropSockets();
    this.events.onState({ phase: "refused", message, reason });
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
    if (this.keepaliveTimer !== null) clearTimeout(this.keepaliveTimer);
    this.keepaliveTimer = null;
    for (const socket of [this.sender, this.receiver]) {
      if (socket === null) continue;
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
    }
    this.sender = this.receiver = null;
  }
}

const CLOSE_GOING_AWAY = 1001;
const CLOSE_POLICY = 1008;
const CLOSE_TRY_AGAIN_LATER = 1013;
const CLOSE_UNAUTHORIZED = 4401;
const CLOSE_FORBIDDEN_ORIGIN = 4403;
const CLOSE_IDLE = 4408;
/** The server's reason for a 1008 that a later attempt fixes: "uid U already has a connected receiver". */
const UID_IN_USE = /already has a connected receiver|uid in use/i;

function describeClose(event: CloseEvent): string {
  if (event.code === CLOSE_POLICY) return "the server still holds this session; retrying";
  if (event.code === CLOSE_TRY_AGAIN_LATER) return event.reason || "the server is full";
  if (event.code === CLOSE_GOING_AWAY) return event.reason || "the server is shutting down";
  if (event.reason) return event.reason;
  return event.wasClean ? "the server closed the connection" : "cannot reach the server";
}
