"use client";
import { useEffect, useRef } from "react";
import type { Exchange } from "@/lib/conversation";
import { voiceToVoiceMs, type Source, type TurnMetrics } from "@/lib/protocol";

function round(ms: number | null | undefined): string {
  return ms === null || ms === undefined ? "–" : `${Math.round(ms)}`;
}

/** The server's breakdown of a turn, for the tooltip. */
function breakdown(m: TurnMetrics): string {
  return [
    `end-of-turn wait ${round(m.eot_wait_ms)} ms`,
    `ASR ${round(m.asr_ms)} ms`,
    `LLM first token ${round(m.llm_first_token_ms)} ms`,
    `first speakable chunk ${round(m.llm_first_chunk_ms)} ms`,
    `TTS first audio ${round(m.tts_first_audio_ms)} ms`,
    `send ${round(m.send_ms)} ms`,
    ...(m.speculated ? [`answer started ${round(m.speculated_ms)} ms before your turn ended`] : []),
    ...(m.speculations_discarded ? [`answers started at your pauses and dropped as you spoke on: ${m.speculations_discarded}`] : []),
  ].join(" · ");
}

function Latency({ exchange }: { exchange: Exchange }) {
  const m = exchange.metrics;
  // Spoken turns: from the end of speech, including the wait that decides the user has finished. Typed
  // turns: from the text's arrival.
  const server = m === null ? null : exchange.spoken ? voiceToVoiceMs(m) : m.first_audio_ms;
  return (
    <>
      {m !== null && server !== null && (
        <span className="latency" title={`Measured by the server: ${breakdown(m)}`}>
          {Math.round(server)} ms {exchange.spoken ? "voice-to-voice" : "to first audio"}
        </span>
      )}
      {exchange.clientLatencyMs !== null && (
        <span className="latency" title="Measured by this page: your voice stopped → the answer started playing">
          {exchange.clientLatencyMs} ms in this browser
        </span>
      )}
    </>
  );
}

/** A link only to web pages; anything else (a document's path or name, another scheme) is not one. */
function webLink(url: string): URL | null {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed : null;
  } catch {
    return null; // not an absolute URL
  }
}

/** Where the answer came from. The server's text is untrusted: React writes it as text, never as markup. */
function Sources({ sources }: { sources: Source[] }) {
  return (
    <ul className="sources" aria-label="Sources">
      {sources.map((source) => {
        const link = webLink(source.url);
        const label = source.title || source.url;
        return (
          <li key={source.url || source.title}>
            {link ? (
              <>
                <a href={link.href} target="_blank" rel="noopener noreferrer">
                  {label}
                </a>{" "}
                {/* The title is the server's to choose: where the link really goes. */}
                <span className="source-where">{link.hostname}</span>
              </>
            ) : (
              <>
                <span>{label}</span>
                {source.title && source.url && <span className="source-where"> {source.url}</span>}
              </>
            )}
          </li>
        );
      })}
    </ul>
  );
}

/** The answer; of one cut off, the part never heard is greyed (the server's history keeps only the rest). */
function AnswerText({ exchange }: { exchange: Exchange }) {
  const heard = exchange.interrupted ? exchange.heardChars : null;
  if (heard === null || heard >= exchange.answer.length) return <>{exchange.answer || "…"}</>;
  return (
    <>
      {exchange.answer.slice(0, heard)}
      <span className="unheard" title="never played: cut off">
        {exchange.answer.slice(heard)}
      </span>
    </>
  );
}

function ExchangeItem({ exchange }: { exchange: Exchange }) {
  const waiting = exchange.spoken && !exchange.userFinal;
  return (
    <li className="exchange" data-turn={exchange.turn ?? undefined}>
      <p className={`bubble user${waiting ? " partial" : ""}`}>
        {exchange.user || (waiting ? "Listening…" : "(nothing heard)")}
      </p>
      {(exchange.answer || (exchange.userFinal && !exchange.answerDone)) && (
        <p className={`bubble assistant${exchange.answerDone ? "" : " streaming"}`}>
          <AnswerText exchange={exchange} />
        </p>
      )}
      {exchange.sources.length > 0 && <Sources sources={exchange.sources} />}
      <p className="meta">
        {exchange.interrupted && <span className="tag">interrupted</span>}
        {exchange.paused && <span className="tag">paused: listening to you</span>}
        {exchange.carriedOn && (
          <span className="tag" title="you went on after a pause taken for your turn's end: the whole question was answered">
            one question across a pause
          </span>
        )}
        {exchange.backchannels.map((heard, i) => (
          <span key={i} className="tag" title="what you said over the answer, which then went on">
            went on after {heard ? `“${heard}”` : "a sound"}
          </span>
        ))}
        {exchange.failed && <span className="tag error">failed</span>}
        <Latency exchange={exchange} />
      </p>
    </li>
  );
}

export default function ConversationView({ exchanges, started }: { exchanges: Exchange[]; started: boolean }) {
  const end = useRef<HTMLDivElement>(null);

  useEffect(() => {
    end.current?.scrollIntoView({ block: "end" });
  }, [exchanges]);

  return (
    <section className="conversation" aria-label="Conversation" aria-live="polite">
      {exchanges.length === 0 && (
        <p className="hint">
          {started
            ? "Say something. You can cut in while the agent talks."
            : "Press Start and allow the microphone, then talk. Or type below once connected."}
        </p>
      )}
      <ol>
        {exchanges.map((exchange) => (
          <ExchangeItem key={exchange.key} exchange={exchange} />
        ))}
      </ol>
      <div ref={end} />
    </section>
  );
}
