/** The page's one AudioContext, shared by the microphone and the player so both run on one clock. */

const WORKLET_MODULES = ["/worklets/mic-processor.js", "/worklets/player-processor.js"];

export function audioSupported(): boolean {
  return typeof AudioContext !== "undefined" && typeof AudioWorkletNode !== "undefined";
}

/**
 * Must be called from a user gesture (a click): browsers keep an AudioContext suspended until one.
 * The context runs at the device's rate; some browsers ignore a requested rate, so we never ask for one
 * and resample instead.
 */
export function createAudioContext(): AudioContext {
  const context = new AudioContext({ latencyHint: "interactive" });
  // Resume inside the gesture; awaiting anything before this would lose the gesture in Safari.
  void context.resume();
  return context;
}

export async function loadWorklets(context: AudioContext): Promise<void> {
  await Promise.all(WORKLET_MODULES.map((url) => context.audioWorklet.addModule(url)));
}
