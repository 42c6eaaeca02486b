/** React state for the page: the conversation, the connection, the microphone and short notices. */
import { useCallback, useEffect, useReducer, useRef, useState } from "react";
import { VoiceAgent } from "./agent";
import { audioSupported, createAudioContext, loadWorklets } from "./audio";
import type { ServerAddress, Settings } from "./config";
import type { ConnectionState } from "./connection";
import { EMPTY_CONVERSATION, conversationReducer } from "./conversation";
import { MicError } from "./mic";
import type { ServerEvent } from "./protocol";

/** How long a notice (an error event, a failed send) stays on screen, in ms. */
const NOTICE_MS = 6000;
/** What the server takes as "forget the conversation so far" (CleanS2S's convention). */
const NEW_TOPIC = "new topic";

export type MicState = "off" | "on" | "muted" | "unavailable";

export interface Notice {
  id: number;
  text: string;
}

/** What the user reads for the server's error codes; other codes (the page's own mistakes) show the server's message. */
const ERROR_NOTICES = new Map([
  ["audio_too_long", "The server refused some microphone audio: too much in one piece."],
  ["text_too_long", "That message is too long for the server: send a shorter one."],
  ["rate_limited", "Too many messages at once: the server is reading them more slowly."],
  ["audio_too_fast", "Audio arrives faster than real time: the server is hearing it at real time."],
  ["bad_uid", "The server did not accept this page's session id: reload the page."],
  ["asr_failed", "Your words could not be transcribed: please say that again."],
  ["llm_failed", "The agent could not come up with an answer: please try again."],
  ["tts_failed", "The answer could not be turned into speech."],
]);

function errorNotice(event: Extract<ServerEvent, { event: "error" }>): string {
  return ERROR_NOTICES.get(event.code) ?? `Server: ${event.message}`;
}

/** A random session id. crypto.randomUUID() exists only on secure pages; getRandomValues everywhere. */
function newUid(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function useVoiceAgent() {
  const [conversation, dispatch] = useReducer(conversationReducer, EMPTY_CONVERSATION);
  const [connection, setConnection] = useState<ConnectionState>({ phase: "closed" });
  const [mic, setMic] = useState<MicState>("off");
  const [notices, setNotices] = useState<Notice[]>([]);
  const agentRef = useRef<VoiceAgent | null>(null);
  const uidRef = useRef<string | null>(null);
  const noticeId = useRef(0);

  const notify = useCallback((text: string) => {
    const id = ++noticeId.current;
    // The same notice again (a server repeating an error) is not stacked: the one on screen is enough.
    setNotices((list) => (list.some((n) => n.text === text) ? list : [...list, { id, text }]));
    setTimeout(() => setNotices((list) => list.filter((n) => n.id !== id)), NOTICE_MS);
  }, []);

  const stop = useCallback(() => {
    agentRef.current?.close();
    agentRef.current = null;
    setMic("off");
    setConnection({ phase: "closed" });
  }, []);

  /** Must run in a click handler: it creates and resumes the AudioContext before its first await. */
  const start = useCallback(
    async (address: ServerAddress, settings: Settings) => {
      if (agentRef.current !== null) return;
      if (!audioSupported()) {
        notify("This browser cannot play or record audio here (no AudioWorklet).");
        return;
      }
      const context = createAudioContext();
      uidRef.current ??= newUid(); // one uid for the page's life, across reconnections and restarts
      const agent = new VoiceAgent(context, { ...address, token: settings.token }, uidRef.current, {
        onServerEvent: (event) => {
          if (event.event === "error") notify(errorNotice(event));
          dispatch({ type: "server", event });
        },
        onConnection: setConnection,
        onClientLatency: (turn, ms) => dispatch({ type: "clientLatency", turn, ms }),
        onHeard: (turn, chars) => dispatch({ type: "heard", turn, chars }),
        onNotice: notify,
      });
      agentRef.current = agent;
      try {
        await loadWorklets(context);
      } catch (error) {
        notify(`Could not load the audio worklets: ${String(error)}`);
        stop();
        return;
      }
      agent.connect();
      try {
        await agent.openMic(settings);
        setMic(agentRef.current === agent ? "on" : "off");
      } catch (error) {
        notify(error instanceof MicError ? `${error.message} You can still type.` : String(error));
        setMic("unavailable");
      }
    },
    [notify, stop],
  );

  const sendText = useCallback(
    (text: string): boolean => {
      const agent = agentRef.current;
      if (agent === null || !agent.sendText(text)) {
        notify("Not connected: press Start, or wait for the connection.");
        return false;
      }
      if (text === NEW_TOPIC) {
        dispatch({ type: "clear" });
      } else {
        dispatch({ type: "typed", text });
      }
      return true;
    },
    [notify],
  );

  /** New server addresses, token or microphone options, while running: the audio keeps playing. */
  const applySettings = useCallback(
    async (address: ServerAddress, settings: Settings) => {
      const agent = agentRef.current;
      if (agent === null) return;
      agent.reconnect({ ...address, token: settings.token });
      try {
        await agent.openMic(settings);
        setMic(agent.muted ? "muted" : "on");
      } catch (error) {
        notify(error instanceof MicError ? error.message : String(error));
        setMic("unavailable");
      }
    },
    [notify],
  );

  const newTopic = useCallback(() => sendText(NEW_TOPIC), [sendText]);

  const setMuted = useCallback((muted: boolean) => {
    const agent = agentRef.current;
    if (agent === null) return;
    agent.muted = muted;
    setMic(muted ? "muted" : "on");
  }, []);

  /** The microphone level (RMS, 0 to 1), read by the meter on each animation frame. */
  const readLevel = useCallback(() => agentRef.current?.level ?? 0, []);

  useEffect(() => stop, [stop]); // leaving the page closes the sockets, the microphone and the audio

  return {
    conversation,
    connection,
    mic,
    notices,
    start,
    stop,
    applySettings,
    sendText,
    newTopic,
    setMuted,
    readLevel,
    notify,
  };
}
