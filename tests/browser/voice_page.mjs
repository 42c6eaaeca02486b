// Drives the browser client in headless Chromium with a fake microphone, for tests/test_browser.py.
//
//   node tests/browser/voice_page.mjs SCENARIO URL MIC_WAV SCREENSHOT [TOKEN]
//
// Chromium plays MIC_WAV as the microphone; the script presses Start, then acts out SCENARIO:
//
// - talk: the fake microphone asks a question, then cuts into the answer (MIC_WAV plays once). Once the next
//   answer plays, the script takes a screenshot, then types a message, starts a new topic and types again,
//   drops the connection (the page must reconnect by itself, to the same session) and types once more.
// - token: the page was opened with ?token=…; it connects, a typed message is answered, a message over the
//   server's --max_text_chars is turned away, and after a reload (the token no longer in the URL) it
//   connects again.
// - refused: the page was opened with a wrong ?token=; the script watches it stop, then sets TOKEN in the
//   settings panel, talks, mutes the microphone and waits for the server to close the idle receiver (and for
//   the page to come back).
// - sources: a typed question to a server that names its sources; then, muted, the script moves the page's
//   clock on by half a minute (the keepalive's interval).
// - backchannel: the fake microphone asks a question, then says "mm" over the answer (MIC_WAV plays once); the
//   script waits for the answer to pause, go on and end.
// - spokenOn: the fake microphone asks half a question, pauses long enough to end the turn, and says the rest
//   over the start of the answer (MIC_WAV plays once); the script waits for the answer to the whole question.
// - proxied: the page came from nginx (deploy/nginx.conf); the fake microphone asks a question once, and once its
//   answer is on screen the script types another.
//
// It prints one JSON object on stdout: what the page showed at each step, and what the test hooks
// (audio_tap.js) recorded. It does so on a failure too (with `failure` set, and exit status 1), to tell what
// went wrong. CHROMIUM_PATH overrides the browser (default /usr/bin/chromium, Debian's package).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// playwright-core is a devDependency of the client, not of the repository root.
const require = createRequire(join(here, "..", "..", "frontend_nextjs", "package.json"));
const { chromium } = require("playwright-core");

const [scenario, url, micWav, screenshot, token] = process.argv.slice(2);
const STEP_TIMEOUT_MS = 30_000;
const NEXT_ANSWER_PLAY_MS = 1500; // how long the next answer plays before the screenshot
// How long the refused page is watched for another attempt: its backoff would have retried within half a
// second, and twice more within the next 3 s.
const WATCH_REFUSED_MS = 4000;
const TOO_LONG_TEXT_CHARS = 2500; // over the server's --max_text_chars (default 2000)
const KEEPALIVE_MS = 30_000; // the page's keepalive interval (lib/connection.ts)

const SCENARIOS = { talk, token: withToken, refused, sources, proxied, backchannel, spokenOn };
if (!(scenario in SCENARIOS)) throw new Error(`unknown scenario ${scenario}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: [
    "--use-fake-ui-for-media-stream", // grant the microphone without a prompt
    "--use-fake-device-for-media-stream",
    // The talk, proxied, backchannel and spokenOn scenarios' microphone speaks once; the others' loops its silence, so the page always sends.
    `--use-file-for-fake-audio-capture=${micWav}${["talk", "proxied", "backchannel", "spokenOn"].includes(scenario) ? "%noloop" : ""}`,
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
  if (scenario === "sources") await page.clock.install(); // its timers run on, until the script moves them on
  await page.goto(url);
  await SCENARIOS[scenario]();
} catch (error) {
  result.failure = String(error);
  process.exitCode = 1;
} finally {
  // What the page showed and recorded, also after a failure: it tells what went wrong.
  if (page !== null) await describe(page).catch(() => {});
  await browser.close();
}
process.stdout.write(JSON.stringify(result));

function waitFor(predicate, arg, timeout = STEP_TIMEOUT_MS) {
  return page.waitForFunction(predicate, arg, { timeout, polling: 50 });
}

async function start() {
  await page.getByRole("button", { name: "Start" }).click();
}

async function connected() {
  await page.getByRole("status").filter({ hasText: "Connected" }).waitFor({ timeout: STEP_TIMEOUT_MS });
}

/** The receiver's `ready` events so far (the sender's carry no session key): one per connection made. */
function receiverReadyCount() {
  return window.__s2sTest.events.filter((e) => "session_key" in e).length;
}

function exchanges() {
  return page.locator(".exchange").evaluateAll(describeExchanges);
}

function notices() {
  return page.locator(".notices li").allTextContents();
}

/** Types a message and waits for its answer (the test's LLM starts each answer with "About <question>:"). */
async function typeMessage(text) {
  await page.getByRole("textbox", { name: "Message" }).fill(text);
  await page.keyboard.press("Enter");
  const answered = (start) =>
    [...document.querySelectorAll(".bubble.assistant")].some((bubble) => bubble.textContent.startsWith(start));
  await waitFor(answered, `About ${text}:`);
}

async function talk() {
  await start();
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
  const sessionsBefore = await page.evaluate(receiverReadyCount);
  await page.evaluate(() => window.__s2sTestDropSockets());
  await waitFor((before) => window.__s2sTest.events.filter((e) => "session_key" in e).length > before, sessionsBefore);
  await connected();
  await typeMessage("are you back");
  result.reconnected = await exchanges();
}

async function backchannel() {
  await start();
  await waitFor(() => window.__s2sTest.events.some((e) => e.event === "resume"));
  // The answer's end was sent: its audio is all here, and then it plays to its end.
  await waitFor(() => window.__s2sTest.events.some((e) => e.event === "metrics" && e.turn === 1));
  await waitFor(() => {
    const { events, sent } = window.__s2sTest;
    const resume = events.find((e) => e.event === "resume");
    return sent.some((m) => m.type === "playback" && m.turn === 1 && m.playing === false && m.t > resume.t);
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  result.spoken = await exchanges();
}

async function spokenOn() {
  await start();
  const carried = () => window.__s2sTest.events.find((e) => e.event === "transcript" && typeof e.continues === "number");
  await waitFor(carried);
  const turn = (await page.evaluate(carried)).turn;
  await waitFor((n) => window.__s2sTest.events.some((e) => e.event === "metrics" && e.turn === n), turn);
  await page.screenshot({ path: screenshot, fullPage: true });
  result.spoken = await exchanges();
}

async function withToken() {
  await start();
  await connected();
  result.pageUrl = page.url();
  await typeMessage("what is the weather");
  result.answered = await exchanges();

  await page.getByRole("textbox", { name: "Message" }).fill("x".repeat(TOO_LONG_TEXT_CHARS));
  await page.keyboard.press("Enter");
  await page.locator(".notices li").filter({ hasText: "too long" }).waitFor({ timeout: STEP_TIMEOUT_MS });
  await page.locator(".tag.error").waitFor({ timeout: STEP_TIMEOUT_MS });
  result.tooLong = { notices: await notices(), exchanges: await exchanges() };
  result.socketsBeforeReload = await page.evaluate(() => window.__s2sTest.sockets);

  await page.reload(); // the same tab: what it kept of the token, it still has
  result.reloadedUrl = page.url();
  await start();
  await connected();
  await typeMessage("still there");
  result.afterReload = await exchanges();
  await page.screenshot({ path: screenshot, fullPage: true });
}

async function refused() {
  await start();
  const refusal = page.locator(".refusal");
  await refusal.waitFor({ timeout: STEP_TIMEOUT_MS });
  result.refusal = await refusal.textContent();
  result.statusWhenRefused = await page.locator(".status").textContent();
  await page.screenshot({ path: screenshot, fullPage: true });
  // Another attempt would open another socket.
  result.triedAgain = await waitFor(() => window.__s2sTest.sockets.length > 1, undefined, WATCH_REFUSED_MS).then(
    () => true,
    () => false,
  );
  result.socketsWhileRefused = await page.evaluate(() => window.__s2sTest.sockets.length);

  await refusal.getByRole("button", { name: "Open settings" }).click();
  const tokenField = page.getByLabel("Token");
  result.tokenFieldType = await tokenField.getAttribute("type");
  await tokenField.fill(token);
  await page.getByRole("button", { name: "Save" }).click();
  await connected();
  result.refusalsAfterSave = await refusal.count();
  await typeMessage("let me in");
  result.answered = await exchanges();

  // Muted, the page sends nothing; the server (--idle_timeout_s) closes the idle receiver.
  const readyBefore = await page.evaluate(receiverReadyCount);
  await page.getByRole("button", { name: "Mute" }).click();
  await waitFor(
    (before) =>
      window.__s2sTest.closes.some((c) => c.code === 4408) &&
      window.__s2sTest.events.filter((e) => "session_key" in e).length > before,
    readyBefore,
  );
  await connected();
  result.afterIdle = { notices: await notices(), refusals: await refusal.count(), exchanges: await exchanges() };
}

async function sources() {
  await start();
  await connected();
  await typeMessage("tell me about solar panels");
  await page.locator(".bubble.assistant:not(.streaming)").waitFor({ timeout: STEP_TIMEOUT_MS });
  result.answered = await exchanges();
  result.sources = await page.locator(".sources li").evaluateAll((items) =>
    items.map((item) => ({
      text: item.textContent,
      links: [...item.querySelectorAll("a")].map((a) => ({
        href: a.getAttribute("href"),
        target: a.getAttribute("target"),
        rel: a.getAttribute("rel"),
        text: a.textContent,
      })),
    })),
  );
  // Markup in a source's title must stay text.
  result.elementsInSources = await page.locator(".sources *:not(li, a, span)").count();
  await page.screenshot({ path: screenshot, fullPage: true });

  // Muted, nothing else goes to the server: half a minute later, a keepalive does.
  await page.getByRole("button", { name: "Mute" }).click();
  await page.clock.runFor(KEEPALIVE_MS + 1000);
  await waitFor(() => window.__s2sTest.sent.some((m) => m.type === "keepalive"));
}

async function proxied() {
  await start();
  const spokenAnswer = () =>
    [...document.querySelectorAll(".bubble.assistant")].some((bubble) => bubble.textContent.startsWith("About heard"));
  await waitFor(spokenAnswer);
  result.spoken = await exchanges();
  await typeMessage("through the proxy");
  result.typed = await exchanges();
  await page.screenshot({ path: screenshot, fullPage: true });
}

async function describe(page) {
  result.status = await page.locator(".status").textContent();
  result.notices = await notices();
  result.pageUrlAtEnd = page.url();
  Object.assign(result, await page.evaluate(() => window.__s2sTest));
  if (result.failure) await page.screenshot({ path: screenshot, fullPage: true });
}

function describeExchanges(items) {
  return items.map((item) => ({
    turn: Number(item.dataset.turn),
    user: item.querySelector(".bubble.user")?.textContent ?? "",
    answer: item.querySelector(".bubble.assistant")?.textContent ?? "",
    unheard: item.querySelector(".bubble.assistant .unheard")?.textContent ?? "",
    meta: item.querySelector(".meta")?.textContent ?? "",
  }));
}
