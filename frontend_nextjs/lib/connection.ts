/**
 * The two WebSockets to the server (extended protocol version 3), reopened with exponential backoff
 * whenever either one closes.
 *
 * The receiver socket (client → server) opens first: its `ready` message hands us the session's key, which
 * nobody else gets. Only then does the sender (server → client) open, presenting that key, so that no one
 * who merely knows our uid can listen to the session; its `ready` makes us connected, and only then does the
 * microphone stream. The key travels in a subprotocol (`s2s.key.<key>`), never in a URL, which proxies and
 * servers write to their logs.
 *
 * When the sockets drop, the next attempt presents the key on the receiver too: the server keeps a session
 * for a while (about 30 s) after its receiver closes, and then resumes it (`resumed: true`), conversation and
 * turn numbers included. A session the server no longer has is refused with 4404; we forget its key and start
 * a new one at once (turns count from 1 again).
 *
 * Some closes are final: a wrong or missing token (4401), a page origin the server does not allow (4403), the
 * session taken over by another tab or window with its key (4409), a client the server does not accept
 * (4426), any other policy refusal (1008). Then it stops, in the "refused" state, until it is replaced by a
 * new connection with other settings. An idle receiver closed by the server (4408) reconnects at once; a
 * client that did not read its messages fast enough (4429) reconnects with the backoff; both resume.
 */
import { checkToken } from "./config";
import {
  PROTOCOL_VERSION,
  parseAudioFrame,
  parseServerEvent,
  type AnswerAudio,
  type ClientMessage,
  type ReadyEvent,
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
  /** Session events from the sender. Its `ready` comes with `resumed` from the receiver's, and without the key. */
  onEvent(event: ServerEvent): void;
  onAudio(audio: AnswerAudio): void;
}

export interface ServerTarget {
  receiverUrl: string;
  senderUrl: string;
  /** The server's shared token (--auth_token), offered as the subprotocol `s2s.token.<token>`; empty: none. */
  token: string;
}

/** The subprotocol the server selects; offered only with a key or a token, which ride in the others. */
const SUBPROTOCOL = "s2s";
const TOKEN_SUBPROTOCOL_PREFIX = "s2s.token.";
const KEY_SUBPROTOCOL_PREFIX = "s2s.key.";
/** What a session key is made of: anything else would not fit in a subprotocol name. */
const SESSION_KEY = /^[A-Za-z0-9_-]{1,256}$/;
/** After this long without a message to the receiver (muted, no microphone), a keepalive goes out. */
const KEEPALIVE_MS = 30_000;
/** An attempt whose `ready` events have not both come by then is given up (a server that does not speak version 3). */
const READY_TIMEOUT_MS = 15_000;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10_000;
/** Microphone frames are dropped, not queued, when this much is still unsent (about 2 s of audio). */
const MAX_BUFFERED_BYTES = 64_000;

export class AgentConnection {
  private sender: WebSocket | null = null;
  private receiver: WebSocket | null = null;
  /** The receiver's `ready` of this attempt, once it came: the sender opens after it. */
  private receiverReady: ReadyEvent | null = null;
  private connected = false;
  /** The server session's key: presented on the sender, and on the receiver to resume the session. */
  private sessionKey: string | null;
  /** This attempt's receiver presented the key and has not been answered yet. */
  private resuming = false;
  private failures = 0; // consecutive attempts that did not get connected
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private readyTimer: ReturnType<typeof setTimeout> | null = null;
  private keepaliveTimer: ReturnType<typeof setTimeout> | null = null;
  /** performance.now() of the last message sent to the receiver. */
  private lastSentAt = 0;
  private closed = false;

  /** `sessionKey`: the key of a session to resume (that of the connection this one replaces), or null. */
  constructor(
    private readonly target: ServerTarget,
    private readonly uid: string,
    private readonly events: ConnectionEvents,
    sessionKey: string | null = null,
  ) {
    this.sessionKey = sessionKey;
  }

  /** The key of the server session, for a connection that replaces this one; null before the first one. */
  get key(): string | null {
    return this.sessionKey;
  }

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

  /** The receiver, once both sockets are ready: before that, the session may not hear us yet. */
  private openReceiverSocket(): WebSocket | null {
    return this.connected && this.receiver?.readyState === WebSocket.OPEN ? this.receiver : null;
  }

  private connect(): void {
    this.retryTimer = null;
    this.events.onState({ phase: "connecting", attempt: this.failures + 1 });
    this.resuming = this.sessionKey !== null;
    const receiver = this.openSocket(this.target.receiverUrl, this.sessionKey);
    if (receiver === null) return;
    this.receiver = receiver;
    this.readyTimer = setTimeout(() => {
      this.readyTimer = null;
      this.retryLater("the server did not get the session ready (does it speak protocol version 3?)");
    }, READY_TIMEOUT_MS);
    // Besides `ready`, only the placeholder replies the server sends to JSON messages for CleanS2S's client:
    // nothing to read.
    receiver.onmessage = ({ data }: MessageEvent<string | ArrayBuffer>) => {
      const event = typeof data === "string" ? parseServerEvent(data) : null;
      if (event?.event === "ready" && this.receiverReady === null) this.onReceiverReady(event);
    };
  }

  private onReceiverReady(ready: ReadyEvent): void {
    const key = ready.session_key;
    if (typeof key !== "string" || !SESSION_KEY.test(key)) {
      this.retryLater("the server sent no usable session key");
      return;
    }
    this.receiverReady = ready;
    this.sessionKey = key;
    this.resuming = false;
    this.openSender(key);
  }

  private openSender(key: string): void {
    const sender = this.openSocket(this.target.senderUrl, key);
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
      if (event.event === "ready") {
        this.onSenderReady(event);
      } else {
        this.events.onEvent(event);
      }
    };
  }

  /** Both sockets are up: the session goes on (or starts), and the microphone may stream. */
  private onSenderReady(ready: ReadyEvent): void {
    if (this.connected) return;
    if (this.readyTimer !== null) clearTimeout(this.readyTimer);
    this.readyTimer = null;
    this.connected = true;
    this.failures = 0;
    this.lastSentAt = performance.now();
    this.scheduleKeepalive();
    this.events.onState({ phase: "connected" });
    // The key stays here: the page needs only to know whether its conversation goes on.
    const { uid, protocol, sample_rate } = ready;
    this.events.onEvent({ event: "ready", uid, protocol, sample_rate, resumed: this.receiverReady?.resumed === true });
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

  private openSocket(base: string, key: string | null): WebSocket | null {
    let socket: WebSocket;
    try {
      const url = new URL(base);
      url.searchParams.set("uid", this.uid);
      url.searchParams.set("protocol", String(PROTOCOL_VERSION)); // the version this page speaks: it can pause
      socket = new WebSocket(url, this.subprotocols(key));
    } catch {
      this.retryLater(`bad server address: ${base}`);
      return null;
    }
    socket.binaryType = "arraybuffer";
    // An error is always followed by a close, which carries the reason.
    socket.onclose = (event) => this.onClose(event);
    return socket;
  }

  /** The key and the token go in subprotocols, not in the URL, which proxies and servers write to their logs. */
  private subprotocols(key: string | null): string[] {
    const offered: string[] = [];
    if (key !== null) offered.push(KEY_SUBPROTOCOL_PREFIX + key);
    if (this.target.token) offered.push(TOKEN_SUBPROTOCOL_PREFIX + this.target.token);
    return offered.length > 0 ? [SUBPROTOCOL, ...offered] : [];
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
      case CLOSE_REPLACED:
        // Whoever has the key now has the session: taking it back would only throw them out in turn.
        this.sessionKey = null;
        this.refuse(
          "This conversation was opened in another tab or window: go on there, or press Stop and Start for a new one.",
          reason,
        );
        return;
      case CLOSE_LEGACY:
        this.refuse("The server does not accept this page's way of connecting: reload the page.", reason);
        return;
      case CLOSE_POLICY:
        // A uid still held (a server of protocol version 1 had not noticed our previous receiver closing yet): the
        // next attempt fixes it. Anything else is final.
        if (UID_IN_USE.test(reason)) break;
        this.refuse("The server refused the connection.", reason);
        return;
      case CLOSE_UNKNOWN_SESSION:
        this.forgetSession();
        return;
      case CLOSE_IDLE:
        // Nothing was sent for too long (the browser held back our timers, say): come back without a fuss.
        this.reconnectNow();
        return;
    }
    this.retryLater(describeClose(event));
  }

  /**
   * The server no longer has our session (it ended while we were away), or no longer takes its key: the next
   * attempt starts a new one. At once when the receiver was only refused the key; otherwise with the backoff,
   * in case the server keeps refusing the keys it hands out.
   */
  private forgetSession(): void {
    const resuming = this.resuming;
    this.sessionKey = null;
    if (resuming) {
      this.reconnectNow();
    } else {
      this.retryLater("the server ended the session; starting a new one");
    }
  }

  private reconnectNow(): void {
    if (this.closed || this.retryTimer !== null) return;
    this.dropSockets();
    this.connect();
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
    for (const timer of [this.keepaliveTimer, this.readyTimer]) {
      if (timer !== null) clearTimeout(timer);
    }
    this.keepaliveTimer = this.readyTimer = null;
    for (const socket of [this.sender, this.receiver]) {
      if (socket === null) continue;
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
    }
    this.sender = this.receiver = null;
    this.receiverReady = null;
    this.connected = this.resuming = false;
  }
}

const CLOSE_GOING_AWAY = 1001;
const CLOSE_POLICY = 1008;
const CLOSE_TRY_AGAIN_LATER = 1013;
const CLOSE_UNAUTHORIZED = 4401;
const CLOSE_FORBIDDEN_ORIGIN = 4403;
/** "unknown session or wrong session key": the session ended (or the server restarted) while we were away. */
const CLOSE_UNKNOWN_SESSION = 4404;
const CLOSE_IDLE = 4408;
/** "replaced by a newer connection": the same session, opened again with its key elsewhere. */
const CLOSE_REPLACED = 4409;
/** "legacy clients are not allowed": not sent to clients that name their uid, as this page does. */
const CLOSE_LEGACY = 4426;
/** "too slow: …": the server could not hand us its messages fast enough. */
const CLOSE_TOO_SLOW = 4429;
/** The server's reason for a 1008 that a later attempt fixes: "uid U already has a connected receiver". */
const UID_IN_USE = /already has a connected receiver|uid in use/i;

function describeClose(event: CloseEvent): string {
  if (event.code === CLOSE_POLICY) return "the server still holds this session; retrying";
  if (event.code === CLOSE_TRY_AGAIN_LATER) return event.reason || "the server is full";
  if (event.code === CLOSE_GOING_AWAY) return event.reason || "the server is shutting down";
  if (event.code === CLOSE_TOO_SLOW) return event.reason || "the connection was too slow for the server";
  if (event.reason) return event.reason;
  return event.wasClean ? "the server closed the connection" : "cannot reach the server";
}
