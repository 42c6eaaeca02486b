import type { Metadata, Viewport } from "next";
import "./globals.css";

export const metadata: Metadata = {
  title: "Voice agent",
  description: "Talk to the s2s speech-to-speech voice agent",
};

export const viewport: Viewport = {
  width: "device-width",
  initialScale: 1,
  // The controls sit at the bottom edge: keep them clear of the home indicator on notched phones.
  viewportFit: "cover",
};

export default function RootLayout({ children }: Readonly<{ children: React.ReactNode }>) {
  return (
    <html lang="en">
      <body>{children}</body>
    </html>
  );
}
