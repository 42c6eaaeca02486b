import type { ConnectionState } from "@/lib/connection";
import type { MicState } from "@/lib/useVoiceAgent";

const MIC_LABELS: Record<MicState, string> = {
  off: "",
  on: "mic on",
  muted: "mic muted",
  unavailable: "no mic",
};

function describe(state: ConnectionState): string {
  switch (state.phase) {
    case "closed":
      return "Not started";
    case "connecting":
      return state.attempt > 1 ? `Reconnecting (attempt ${state.attempt})…` : "Connecting…";
    case "connected":
      return "Connected";
    case "waiting":
      return `Retrying in ${Math.ceil(state.retryInMs / 1000)} s: ${state.reason}`;
    case "refused":
      return "Connection refused";
  }
}

export default function StatusIndicator({ connection, mic }: { connection: ConnectionState; mic: MicState }) {
  return (
    <p className="status" role="status" aria-live="polite" data-phase={connection.phase}>
      <span className="status-dot" aria-hidden="true" />
      <span className="status-text">{describe(connection)}</span>
      {MIC_LABELS[mic] && <span className="status-mic">{MIC_LABELS[mic]}</span>}
    </p>
  );
}
