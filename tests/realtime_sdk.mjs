// One spoken turn through the official OpenAI JavaScript SDK's realtime client (OpenAIRealtimeWS), for
// tests/test_realtime.py.
//
//   node tests/realtime_sdk.mjs BASE_URL TOKEN PCM_FILE
//
// BASE_URL is https://HOST:PORT/v1: the SDK always opens wss:// (trust the server's certificate with
// NODE_EXTRA_CA_CERTS). PCM_FILE is pcm16 at 24 kHz, sent in 200 ms pieces. Prints one JSON line when the response
// is done: the types of the events in order, the answer's transcript, its audio in bytes, the response's status.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, "..", "frontend_nextjs", "package.json"));
const { OpenAI } = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");

const [baseURL, apiKey, pcmFile] = process.argv.slice(2);
const rt = new OpenAIRealtimeWS({ model: "gpt-realtime" }, new OpenAI({ apiKey, baseURL }));
const types = [];
let audioBytes = 0;
let transcript = "";

const give_up = setTimeout(() => {
  console.log(JSON.stringify({ error: "no response.done within 30 s", types }));
  process.exit(1);
}, 30000);
rt.on("event", (event) => types.push(event.type));
rt.on("error", (err) => {
  console.log(JSON.stringify({ error: String(err.message), types }));
  process.exit(1);
});
rt.on("response.output_audio.delta", (event) => {
  audioBytes += Buffer.from(event.delta, "base64").length;
});
rt.on("response.output_audio_transcript.done", (event) => {
  transcript = event.transcript;
});
rt.on("response.done", (event) => {
  clearTimeout(give_up);
  console.log(JSON.stringify({ types, transcript, audioBytes, status: event.response.status }));
  rt.close();
});
rt.socket.on("open", async () => {
  const pcm = readFileSync(pcmFile);
  for (let i = 0; i < pcm.length; i += 9600) {
    rt.send({ type: "input_audio_buffer.append", audio: pcm.subarray(i, i + 9600).toString("base64") });
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
});
