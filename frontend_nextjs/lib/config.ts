/**
 * Where the server is, and the user's settings. The server's addresses are chosen at run time, in this order:
 * 1. the page URL: `?receiver=ws://host:9001&sender=ws://host:9002`;
 * 2. the settings panel (saved in localStorage);
 * 3. `/s2s-config.json` from the page's own origin, which the Python server answers when it serves this page (its
 *    ports, or the URLs a proxy in front of it is reached at);
 * 4. the server's default ports on the page's host: ws://<host>:9001 and ws://<host>:9002.
 *
 * The token, for a server started with --auth_token, comes from `?token=` in the page URL (taken out of the
 * address bar at once) or from the settings panel, and is kept for the tab only (sessionStorage).
 */
import { PROTOCOL_VERSION } from "./protocol";

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
  /** The server's shared token; empty: none. Saved for this tab only, never with the other settings. */
  token: string;
}

export const DEFAULT_SETTINGS: Settings = {
  receiverUrl: "",
  senderUrl: "",
  token: "",
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
};

const DEFAULT_RECEIVER_PORT = 9001;
const DEFAULT_SENDER_PORT = 9002;
const SETTINGS_KEY = "s2s-client-settings";
const TOKEN_KEY = "s2s-client-token";
const TOKEN_PARAM = "token";
/** The characters a token may have: it travels in a WebSocket subprotocol name, `s2s.token.<token>`. */
const TOKEN_CHARS = /^[A-Za-z0-9._~-]*$/;
const SERVER_CONFIG_PATH = "/s2s-config.json";
const SERVER_CONFIG_TIMEOUT_MS = 2000;

/**
 * What the Python server answers at /s2s-config.json: the sockets' ports on the page's own host, or their whole
 * URLs when a proxy in front of the server says where clients reach them (--public_receiver_url/--public_sender_url).
 */
interface ServerConfig {
  protocol: number;
  receiver_port: number;
  sender_port: number;
  receiver_url?: string;
  sender_url?: string;
  sample_rate: number;
}

export function loadSettings(): Settings {
  let saved: Partial<Settings> = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}") as Partial<Settings>;
  } catch {
    // unreadable or unavailable: the defaults
  }
  return { ...DEFAULT_SETTINGS, ...saved, token: loadToken() };
}

export function saveSettings(settings: Settings): void {
  const { token, ...lasting } = settings;
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(lasting));
  } catch {
    // Storage can be unavailable (private browsing, disabled cookies); the settings then last for this page only.
  }
  saveToken(token);
}

export function checkToken(text: string): boolean {
  return TOKEN_CHARS.test(text);
}

function loadToken(): string {
  try {
    const token = sessionStorage.getItem(TOKEN_KEY) ?? "";
    return checkToken(token) ? token : "";
  } catch {
    return "";
  }
}

function saveToken(token: string): void {
  try {
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
    }
  } catch {
    // no storage: the token lasts until the page is reloaded (it stays in the settings in memory)
  }
}

export type UrlToken = { kind: "none" } | { kind: "taken"; token: string } | { kind: "invalid" };

/**
 * Takes `?token=` out of the page URL at once, so that it is neither bookmarked nor shared with the
 * address, and keeps it for this tab. A token with characters a token cannot have is removed too, not kept.
 */
export function takeTokenFromUrl(win: Window): UrlToken {
  const url = new URL(win.location.href);
  if (!url.searchParams.has(TOKEN_PARAM)) return { kind: "none" };
  const token = (url.searchParams.get(TOKEN_PARAM) ?? "").trim();
  url.searchParams.delete(TOKEN_PARAM);
  win.history.replaceState(win.history.state, "", url);
  if (!checkToken(token)) return { kind: "invalid" };
  if (!token) return { kind: "none" };
  saveToken(token);
  return { kind: "taken", token };
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
    const urlsOk = [config.receiver_url, config.sender_url].every((url) => url === undefined || checkSocketUrl(url));
    return config.protocol === PROTOCOL_VERSION && portsOk && urlsOk ? (config as ServerConfig) : null;
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
      receiverUrl: config.receiver_url ?? socketUrl(page, config.receiver_port),
      senderUrl: config.sender_url ?? socketUrl(page, config.sender_port),
      source: "server",
    };
  }
  return {
    receiverUrl: socketUrl(page, DEFAULT_RECEIVER_PORT),
    senderUrl: socketUrl(page, DEFAULT_SENDER_PORT),
    source: "default",
  };
}
