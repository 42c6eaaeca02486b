"use client";
import { useState, type FormEvent } from "react";
import { DEFAULT_SETTINGS, checkSocketUrl, checkToken, type ServerAddress, type Settings } from "@/lib/config";

const URL_FIELDS: { key: "receiverUrl" | "senderUrl"; label: string }[] = [
  { key: "receiverUrl", label: "Receiver socket (microphone → server)" },
  { key: "senderUrl", label: "Sender socket (server → speaker)" },
];

const AUDIO_OPTIONS: { key: "echoCancellation" | "noiseSuppression" | "autoGainControl"; label: string }[] = [
  { key: "echoCancellation", label: "Echo cancellation (lets you cut in while the answer plays aloud)" },
  { key: "noiseSuppression", label: "Noise suppression" },
  { key: "autoGainControl", label: "Automatic gain control" },
];

const SOURCE_LABELS: Record<ServerAddress["source"], string> = {
  "page URL": "from the page URL (?receiver=…&sender=…), which overrides these settings",
  settings: "from these settings",
  server: "from the server that served this page",
  default: "the default ports on this page's host",
};

interface Props {
  settings: Settings;
  address: ServerAddress;
  onSave: (settings: Settings) => void;
}

export default function SettingsPanel({ settings, address, onSave }: Props) {
  const [draft, setDraft] = useState(settings);
  const urlsOk =
    (draft.receiverUrl.trim() === "" && draft.senderUrl.trim() === "") ||
    (checkSocketUrl(draft.receiverUrl) !== null && checkSocketUrl(draft.senderUrl) !== null);
  const tokenOk = checkToken(draft.token.trim());

  function submit(event: FormEvent) {
    event.preventDefault();
    if (!urlsOk || !tokenOk) return;
    onSave({
      ...draft,
      receiverUrl: draft.receiverUrl.trim(),
      senderUrl: draft.senderUrl.trim(),
      token: draft.token.trim(),
    });
  }

  return (
    <form id="settings" className="settings" onSubmit={submit}>
      <p className="settings-current">
        Server: <code>{address.receiverUrl}</code> and <code>{address.senderUrl}</code>,{" "}
        {SOURCE_LABELS[address.source]}.
      </p>
      {URL_FIELDS.map(({ key, label }) => (
        <label key={key}>
          {label}
          <input
            type="url"
            value={draft[key]}
            placeholder={address[key]}
            onChange={(event) => setDraft({ ...draft, [key]: event.target.value })}
            inputMode="url"
            autoComplete="off"
          />
        </label>
      ))}
      {!urlsOk && <p className="field-error">Give both addresses as ws:// or wss:// URLs, or leave both empty.</p>}
      <label>
        Token (when the server asks for one; kept for this tab only)
        <input
          type="password"
          value={draft.token}
          onChange={(event) => setDraft({ ...draft, token: event.target.value })}
          autoComplete="off"
          spellCheck={false}
        />
      </label>
      {!tokenOk && <p className="field-error">A token has only letters, digits and the characters - _ . ~</p>}
      {AUDIO_OPTIONS.map(({ key, label }) => (
        <label key={key} className="check">
          <input
            type="checkbox"
            checked={draft[key]}
            onChange={(event) => setDraft({ ...draft, [key]: event.target.checked })}
          />
          {label}
        </label>
      ))}
      <div className="settings-actions">
        <button type="button" onClick={() => setDraft(DEFAULT_SETTINGS)}>
          Reset
        </button>
        <button type="submit" className="primary" disabled={!urlsOk || !tokenOk}>
          Save
        </button>
      </div>
    </form>
  );
}
