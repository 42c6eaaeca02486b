/**
 * Where the server is, and the user's settings. The server's addresses are chosen at run time, in this order:
 * 1. the page URL: `?receiver=ws://host:9001&sender=ws://host:9002`;
 * 2. the settings panel (saved in localStorage);
 * 3. `/s2s-config.json` from the page's own origin, which the Python server answers when it serves this page;
 * 4. the server's default ports on the page's host: ws://<host>:9001 and ws://<host>:9002.
 */

export interface ServerAddress {
  receiverUrl: string;
  senderUrl: string;
  /** Which rule above chose it, shown in the settings panel. */
  source: "page URL" | "settings" | "server" | "default";
}

export interface Settings {
  /** Empty: not set, the next rule decides. */
  receiverUrl: string;
  senderUrl: string;
  // getUserMedia audio processing; echo cancellation lets the user cut in while the answer plays aloud.
  echoCancellation: boolean;
  noiseSuppression: boolean;
  autoGainControl: boolean;
}

export const DEFAULT_SETTINGS: Settings = {
  receiverUrl: "",
  senderUrl: "",
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
};

const DEFAULT_RECEIVER_PORT = 9001;
const DEFAULT_SENDER_PORT = 9002;
const SETTINGS_KEY = "s2s-client-settings";
const SERVER_CONFIG_PATH = "/s2s-config.json";
const SERVER_CONFIG_TIMEOUT_MS = 2000;

/** What the Python server answers at /s2s-config.json. */
interface ServerConfig {
  protocol: number;
  receiver_port: number;
  sender_port: number;
  sample_rate: number;
}

export function loadSettings(): Settings {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}") as Partial<Settings>;
    return { ...DEFAULT_SETTINGS, ...saved };
  } catch {
    return { ...DEFAULT_SETTINGS };
  }
}

export function saveSettings(settings: Settings): void {
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch {
    // Storage can be unavailable (private browsing, disabled cookies); the settings then last for this page only.
  }
}

/** A ws:// or wss:// URL, or null. */
export function checkSocketUrl(text: string): string | null {
  try {
    const url = new URL(text.trim());
    return url.protocol === "ws:" || url.protocol === "wss:" ? url.toString() : null;
  } catch {
    return null;
  }
}

function socketUrl(page: Location, port: number): string {
  // An https page may only open wss:// sockets (mixed content).
  const scheme = page.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${page.hostname || "localhost"}:${port}`; // no hostname: opened from a file
}

async function fetchServerConfig(page: Location): Promise<ServerConfig | null> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), SERVER_CONFIG_TIMEOUT_MS);
  try {
    const response = await fetch(new URL(SERVER_CONFIG_PATH, page.origin), { signal: abort.signal, cache: "no-store" });
    if (!response.ok) return null;
    const config = (await response.json()) as Partial<ServerConfig>;
    const portsOk = Number.isInteger(config.receiver_port) && Number.isInteger(config.sender_port);
    return config.protocol === 1 && portsOk ? (config as ServerConfig) : null;
  } catch {
    return null; // not served by the Python server (e.g. `npm run dev`), or not reachable
  } finally {
    clearTimeout(timer);
  }
}

export async function resolveServerAddress(page: Location, settings: Settings): Promise<ServerAddress> {
  const query = new URLSearchParams(page.search);
  const fromQuery = [checkSocketUrl(query.get("receiver") ?? ""), checkSocketUrl(query.get("sender") ?? "")];
  if (fromQuery[0] && fromQuery[1]) {
    return { receiverUrl: fromQuery[0], senderUrl: fromQuery[1], source: "page URL" };
  }
  const fromSettings = [checkSocketUrl(settings.receiverUrl), checkSocketUrl(settings.senderUrl)];
  if (fromSettings[0] && fromSettings[1]) {
    return { receiverUrl: fromSettings[0], senderUrl: fromSettings[1], source: "settings" };
  }
  const config = page.protocol.startsWith("http") ? await fetchServerConfig(page) : null;
  if (config) {
    return {
      receiverUrl: socketUrl(page, config.receiver_port),
      senderUrl: socketUrl(page, config.sender_port),
      source: "server",
    };
  }
  return {
    receiverUrl: socketUrl(page, DEFAULT_RECEIVER_PORT),
    senderUrl: socketUrl(page, DEFAULT_SENDER_PORT),
    source: "default",
  };
}
