"use client";
import { useState, type FormEvent } from "react";

/** Typed input: the server answers it like speech. */
export default function Composer({ disabled, onSend }: { disabled: boolean; onSend: (text: string) => boolean }) {
  const [text, setText] = useState("");

  function submit(event: FormEvent) {
    event.preventDefault();
    const trimmed = text.trim();
    if (trimmed && onSend(trimmed)) setText("");
  }

  return (
    <form className="composer" onSubmit={submit}>
      <input
        type="text"
        value={text}
        onChange={(event) => setText(event.target.value)}
        placeholder="Type a message"
        aria-label="Message"
        enterKeyHint="send"
        autoComplete="off"
      />
      <button type="submit" disabled={disabled || !text.trim()}>
        Send
      </button>
    </form>
  );
}
