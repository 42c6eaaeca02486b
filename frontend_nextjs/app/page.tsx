import VoiceApp from "@/components/VoiceApp";

export default function Page() {
  return <VoiceApp />;
}
