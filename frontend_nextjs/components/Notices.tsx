import type { Notice } from "@/lib/useVoiceAgent";

export default function Notices({ notices }: { notices: Notice[] }) {
  return (
    <ul className="notices" role="alert">
      {notices.map((notice) => (
        <li key={notice.id}>{notice.text}</li>
      ))}
    </ul>
  );
}
