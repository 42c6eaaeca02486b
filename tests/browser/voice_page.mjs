// Drives the browser client in headless Chromium with a fake microphone, for tests/test_browser.py.
//
//   node tests/browser/voice_page.mjs URL MIC_WAV SCREENSHOT
//
// Chromium plays MIC_WAV as the microphone. The script presses Start; the fake microphone asks a
// question, then cuts into the answer. Once the next answer plays, the script takes a screenshot, then
// types a message, starts a new topic and types again, drops the connection (the page must reconnect by
// itself) and types once more. It prints one JSON object on stdout: what the page showed at each step,
// and what the test hooks (audio_tap.js) recorded. It does so on a failure too (with `failure` set, and
// exit status 1), to tell what went wrong. CHROMIUM_PATH overrides the browser (default /usr/bin/chromium,
// Debian's package).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// playwright-core is a devDependency of the client, not of the repository root.
const require = createRequire(join(here, "..", "..", "frontend_nextjs", "package.json"));
const { chromium } = require("playwright-core");

const [url, micWav, screenshot] = process.argv.slice(2);
const STEP_TIMEOUT_MS = 30_000;
const NEXT_ANSWER_PLAY_MS = 1500; // how long the next answer plays before the screenshot

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: [
    "--use-fake-ui-for-media-stream", // grant the microphone without a prompt
    "--use-fake-device-for-media-stream",
    `--use-file-for-fake-audio-capture=${micWav}%noloop`,
    "--autoplay-policy=no-user-gesture-required",
  ],
});
const result = { pageErrors: [], console: [] };
let page = null;
try {
  // A phone-sized window: the screenshot shows the layout people get on their phones.
  page = await browser.newPage({ viewport: { width: 412, height: 860 } });
  page.on("pageerror", (error) => result.pageErrors.push(String(error)));
  page.on("console", (message) => result.console.push(`${message.type()}: ${message.text()}`));
  await page.addInitScript({ content: readFileSync(join(here, "audio_tap.js"), "utf8") });
  await page.goto(url);
  await page.getByRole("button", { name: "Start" }).click();

  const waitFor = (predicate, arg) => page.waitForFunction(predicate, arg, { timeout: STEP_TIMEOUT_MS, polling: 50 });
  const exchanges = () => page.locator(".exchange").evaluateAll(describeExchanges);
  // Types a message and waits for its answer (the test's fake LLM starts each answer with "About <question>:").
  const typeMessage = async (text) => {
    await page.getByRole("textbox", { name: "Message" }).fill(text);
    await page.keyboard.press("Enter");
    const answered = (start) =>
      [...document.querySelectorAll(".bubble.assistant")].some((bubble) => bubble.textContent.startsWith(start));
    await waitFor(answered, `About ${text}:`);
  };

  // Speech: the question, its answer, the user cutting in, the next answer.
  await waitFor(() => window.__s2sTest.events.some((e) => e.event === "interrupt"));
  await waitFor(() => window.__s2sTest.audio.some((a) => a.turn === 2));
  await page.waitForTimeout(NEXT_ANSWER_PLAY_MS);
  await page.screenshot({ path: screenshot, fullPage: true });
  result.spoken = await exchanges();

  // Typing, a new topic, then a dropped connection.
  await typeMessage("what is two plus two");
  result.typed = await exchanges();
  await page.getByRole("button", { name: "New topic" }).click();
  result.afterNewTopic = await exchanges();
  await typeMessage("hello again");
  result.newTopic = await exchanges();
  await page.evaluate(() => window.__s2sTestDropSockets());
  await waitFor(() => window.__s2sTest.events.filter((e) => e.event === "ready").length >= 2);
  await page.getByRole("status").filter({ hasText: "Connected" }).waitFor({ timeout: STEP_TIMEOUT_MS });
  await typeMessage("are you back");
  result.reconnected = await exchanges();
} catch (error) {
  result.failure = String(error);
  process.exitCode = 1;
} finally {
  // What the page showed and recorded, also after a failure: it tells what went wrong.
  if (page !== null) await describe(page).catch(() => {});
  await browser.close();
}
process.stdout.write(JSON.stringify(result));

async function describe(page) {
  result.status = await page.locator(".status").textContent();
  result.notices = await page.locator(".notices li").allTextContents();
  Object.assign(result, await page.evaluate(() => window.__s2sTest));
  if (result.failure) await page.screenshot({ path: screenshot, fullPage: true });
}

function describeExchanges(items) {
  return items.map((item) => ({
    turn: Number(item.dataset.turn),
    user: item.querySelector(".bubble.user")?.textContent ?? "",
    answer: item.querySelector(".bubble.assistant")?.textContent ?? "",
    meta: item.querySelector(".meta")?.textContent ?? "",
  }));
}
