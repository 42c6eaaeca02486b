"use client";
/** The whole page: status bar, settings, conversation, and the controls at the bottom. */
import { useEffect, useState } from "react";
import {
  loadSettings,
  resolveServerAddress,
  saveSettings,
  takeTokenFromUrl,
  type ServerAddress,
  type Settings,
} from "@/lib/config";
import { useVoiceAgent } from "@/lib/useVoiceAgent";
import Composer from "./Composer";
import ConversationView from "./ConversationView";
import LevelMeter from "./LevelMeter";
import Notices from "./Notices";
import SettingsPanel from "./SettingsPanel";
import StatusIndicator from "./StatusIndicator";

export default function VoiceApp() {
  const agent = useVoiceAgent();
  const [settings, setSettings] = useState<Settings | null>(null);
  const [address, setAddress] = useState<ServerAddress | null>(null);
  const [showSettings, setShowSettings] = useState(false);
  const running = agent.connection.phase !== "closed";
  const connected = agent.connection.phase === "connected";
  const { notify } = agent;

  // Settings live in the browser's storage and the address may come from the server: both only in the browser.
  useEffect(() => {
    const fromUrl = takeTokenFromUrl(window); // first: out of the address bar at once
    const saved = loadSettings();
    if (fromUrl.kind === "taken") saved.token = fromUrl.token; // also where the browser offers no storage
    if (fromUrl.kind === "invalid") notify("The token in the page address is not a valid token: set it in Settings.");
    void resolveServerAddress(window.location, saved).then((resolved) => {
      setSettings(saved);
      setAddress(resolved);
    });
  }, [notify]);

  function toggleRunning() {
    if (running) {
      agent.stop();
    } else if (address && settings) {
      void agent.start(address, settings);
    }
  }

  async function onSaveSettings(next: Settings) {
    saveSettings(next);
    setSettings(next);
    const nextAddress = await resolveServerAddress(window.location, next);
    setAddress(nextAddress);
    setShowSettings(false);
    await agent.applySettings(nextAddress, next);
  }

  return (
    <main className="app">
      <header className="topbar">
        <h1>Voice agent</h1>
        <StatusIndicator connection={agent.connection} mic={agent.mic} />
        <button
          type="button"
          className="icon-button"
          aria-expanded={showSettings}
          aria-controls="settings"
          onClick={() => setShowSettings(!showSettings)}
        >
          Settings
        </button>
      </header>

      {showSettings && settings && address && (
        <SettingsPanel settings={settings} address={address} onSave={onSaveSettings} />
      )}

      {agent.connection.phase === "refused" && (
        <div className="refusal" role="alert">
          <p>{agent.connection.message}</p>
          {agent.connection.reason && <p className="refusal-reason">Server: {agent.connection.reason}</p>}
          <button type="button" onClick={() => setShowSettings(true)}>
            Open settings
          </button>
        </div>
      )}

      <ConversationView exchanges={agent.conversation.exchanges} started={running} />
      <Notices notices={agent.notices} />

      <footer className="controls">
        <div className="voice-row">
          <button
            type="button"
            className={running ? "primary stop" : "primary"}
            disabled={!address || !settings}
            onClick={toggleRunning}
          >
            {running ? "Stop" : "Start"}
          </button>
          <LevelMeter readLevel={agent.readLevel} active={agent.mic === "on"} />
          <button
            type="button"
            aria-pressed={agent.mic === "muted"}
            disabled={agent.mic !== "on" && agent.mic !== "muted"}
            onClick={() => agent.setMuted(agent.mic !== "muted")}
          >
            {agent.mic === "muted" ? "Unmute" : "Mute"}
          </button>
          <button type="button" disabled={!connected} onClick={agent.newTopic}>
            New topic
          </button>
        </div>
        <Composer disabled={!connected} onSend={agent.sendText} />
      </footer>
    </main>
  );
}
