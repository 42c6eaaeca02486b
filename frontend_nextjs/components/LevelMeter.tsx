"use client";
import { useEffect, useRef } from "react";

/** The meter spans this range of RMS levels, in dBFS: -60 is a quiet room, 0 is full scale. */
const FLOOR_DB = -60;

/**
 * Microphone level, redrawn on every animation frame straight into the DOM, so the audio's 50 blocks per
 * second do not re-render the page.
 */
export default function LevelMeter({ readLevel, active }: { readLevel: () => number; active: boolean }) {
  const bar = useRef<HTMLDivElement>(null);

  useEffect(() => {
    if (!active) {
      bar.current?.style.setProperty("--level", "0");
      return;
    }
    let frame = 0;
    const draw = () => {
      const db = 20 * Math.log10(Math.max(readLevel(), 1e-6));
      const level = Math.min(1, Math.max(0, (db - FLOOR_DB) / -FLOOR_DB));
      bar.current?.style.setProperty("--level", level.toFixed(3));
      frame = requestAnimationFrame(draw);
    };
    frame = requestAnimationFrame(draw);
    return () => cancelAnimationFrame(frame);
  }, [active, readLevel]);

  return (
    <div className="meter" role="img" aria-label={active ? "microphone level" : "microphone off"}>
      <div className="meter-bar" ref={bar} />
    </div>
  );
}
