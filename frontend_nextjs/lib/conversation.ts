/**
 * The conversation as the page shows it: one exchange per turn (what the user said or typed, and the
 * answer), built from the server's events by a reducer.
 */
import type { ServerEvent, Source, TurnMetrics } from "./protocol";

/** Sources shown under an answer, at most. */
export const MAX_SOURCES = 5;

export interface Exchange {
  /** Unique in the page, for React. */
  key: number;
  /** The server session it belongs to: turn numbers restart with each new one (see Conversation.session). */
  session: number;
  /** The server's turn; null for typed text the server has not answered yet. */
  turn: number | null;
  spoken: boolean;
  /** The transcript (partial while `userFinal` is false) or the typed text. */
  user: string;
  userFinal: boolean;
  answer: string;
  answerDone: boolean;
  interrupted: boolean;
  /** The user is speaking over the answer, which waits (the `pause` event) until it goes on or is cut off. */
  paused: boolean;
  /** The question went on after a pause the server took for the end of the turn (see the `transcript` event). */
  carriedOn: boolean;
  /** What the user said over the answer that let it go on ("" for a sound with no words), in order. */
  backchannels: string[];
  /** Of an answer cut off: how many of its first characters the user heard (the rest never played). */
  heardChars: number | null;
  failed: boolean;
  /** What the answer drew on (the `sources` event): de-duplicated, at most MAX_SOURCES. */
  sources: Source[];
  metrics: TurnMetrics | null;
  /** The user stopped speaking → first answer sample played, in ms, measured by this page. */
  clientLatencyMs: number | null;
}

export interface Conversation {
  exchanges: Exchange[];
  nextKey: number;
  /**
   * Counts the server's new sessions: `ready` events, except those of a session resumed after a dropped
   * connection, whose turns go on.
   */
  session: number;
  /** The view was cleared after this turn of the session: later events of those turns are not shown. */
  clearedThrough: number;
}

export type ConversationAction =
  | { type: "server"; event: ServerEvent }
  | { type: "typed"; text: string }
  | { type: "clientLatency"; turn: number; ms: number }
  | { type: "heard"; turn: number; chars: number }
  | { type: "clear" };

export const EMPTY_CONVERSATION: Conversation = { exchanges: [], nextKey: 1, session: 0, clearedThrough: 0 };

function newExchange(state: Conversation, fields: Partial<Exchange>): Exchange {
  return {
    key: state.nextKey,
    session: state.session,
    turn: null,
    spoken: false,
    user: "",
    userFinal: false,
    answer: "",
    answerDone: false,
    interrupted: false,
    paused: false,
    carriedOn: false,
    backchannels: [],
    heardChars: null,
    failed: false,
    sources: [],
    metrics: null,
    clientLatencyMs: null,
    ...fields,
  };
}

/** Index of the exchange of `turn` in the current session, or -1. */
function findTurn(state: Conversation, turn: number | null): number {
  return state.exchanges.findIndex((x) => x.session === state.session && x.turn === turn);
}

/** Index of the oldest typed text still waiting for the server to give it a turn, or -1. */
function findWaitingText(state: Conversation): number {
  return state.exchanges.findIndex((x) => x.session === state.session && x.turn === null && !x.failed);
}

/** Applies `change` to the exchange of `turn`, creating the exchange when the turn is new. */
function updateTurn(
  state: Conversation,
  turn: number,
  spoken: boolean,
  change: (x: Exchange) => Partial<Exchange>,
): Conversation {
  let index = findTurn(state, turn);
  if (index < 0 && !spoken) {
    // A turn the server started for typed text: the oldest typed text still waiting for its turn.
    index = findWaitingText(state);
  }
  if (index < 0) {
    const created = newExchange(state, { turn, spoken, userFinal: !spoken });
    state = { ...state, exchanges: [...state.exchanges, created], nextKey: state.nextKey + 1 };
    index = state.exchanges.length - 1;
  }
  const updated = { ...state.exchanges[index], turn, ...change(state.exchanges[index]) };
  return { ...state, exchanges: state.exchanges.map((x, i) => (i === index ? updated : x)) };
}

function hasTurn(state: Conversation, turn: number): boolean {
  return findTurn(state, turn) >= 0;
}

/** `known` and then `more`, each source once (by its url, or its title when it has none), MAX_SOURCES at most. */
function addSources(known: Source[], more: Source[]): Source[] {
  const seen = new Set(known.map((source) => source.url || source.title));
  const all = [...known];
  for (const source of more) {
    const key = source.url || source.title;
    if (all.length >= MAX_SOURCES) break;
    if (seen.has(key)) continue;
    seen.add(key);
    all.push(source);
  }
  return all;
}

/**
 * What was under way when the connection dropped ended there: the server cut off the answer (a resumed session
 * goes on without it), and its end was sent to no one. Typed text still waiting for a turn got none either.
 */
function endUnfinished(state: Conversation): Conversation {
  const end = (x: Exchange): Exchange =>
    x.turn === null ? { ...x, failed: true, answerDone: true } : { ...x, interrupted: true, answerDone: true };
  const unfinished = (x: Exchange) => x.session === state.session && !x.answerDone && !x.failed;
  return { ...state, exchanges: state.exchanges.map((x) => (unfinished(x) ? end(x) : x)) };
}

/** Chinese characters and CJK marks: no space between two transcripts where one ends and the next begins with them. */
const WIDE = /[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]/;

/**
 * The words of `turn` carry on the question of `continued`, whose answer they cut off: one exchange shows the whole
 * question (as the server asks it) with the new answer, and the cut answer, which the server forgot, goes.
 */
function carryOn(state: Conversation, continued: number, turn: number, text: string): Conversation {
  const index = findTurn(state, continued);
  const before = index < 0 ? "" : state.exchanges[index].user;
  const space = before && text && !(WIDE.test(before.slice(-1)) && WIDE.test(text.slice(0, 1))) ? " " : "";
  const kept = { ...state, exchanges: state.exchanges.filter((_, i) => i !== index) };
  return updateTurn(kept, turn, true, () => ({ user: before + space + text, userFinal: true, carriedOn: true }));
}

/** Errors about typed text the server turned away without starting a turn for it. */
const TEXT_REFUSALS: ReadonlySet<string> = new Set(["text_too_long", "bad_text"]);

function applyEvent(state: Conversation, event: ServerEvent): Conversation {
  if (event.event === "ready") {
    const ended = endUnfinished(state);
    return event.resumed === true ? ended : { ...ended, session: ended.session + 1, clearedThrough: 0 };
  }
  // A cleared turn can still report (its metrics, the interrupt that ends its audio): not shown.
  if (event.turn !== null && event.turn <= state.clearedThrough) return state;
  switch (event.event) {
    case "speech_start":
      return updateTurn(state, event.turn, true, () => ({}));
    case "transcript":
      if (event.final && typeof event.continues === "number") return carryOn(state, event.continues, event.turn, event.text);
      return updateTurn(state, event.turn, true, () => ({ user: event.text, userFinal: event.final }));
    case "answer":
      return updateTurn(state, event.turn, false, (x) => ({ answer: x.answer + event.text, answerDone: event.end }));
    case "interrupt":
      return hasTurn(state, event.turn)
        ? updateTurn(state, event.turn, false, () => ({ interrupted: true, paused: false, answerDone: true }))
        : state;
    case "pause":
      return hasTurn(state, event.turn) ? updateTurn(state, event.turn, false, () => ({ paused: true })) : state;
    case "resume":
      return hasTurn(state, event.turn)
        ? updateTurn(state, event.turn, false, (x) => ({ paused: false, backchannels: [...x.backchannels, event.heard] }))
        : state;
    case "metrics":
      // Sent when the turn is over: all of the answer was sent, or it was cut off.
      return updateTurn(state, event.turn, false, (x) => ({
        metrics: event.metrics,
        interrupted: x.interrupted || event.metrics.interrupted,
        answerDone: true,
      }));
    case "sources":
      return updateTurn(state, event.turn, false, (x) => ({ sources: addSources(x.sources, event.sources) }));
    case "error": {
      if (event.turn !== null) return updateTurn(state, event.turn, false, () => ({ failed: true, answerDone: true }));
      // Typed text refused: the oldest text still waiting for its turn will get none.
      const waiting = TEXT_REFUSALS.has(event.code) ? findWaitingText(state) : -1;
      if (waiting < 0) return state; // otherwise, not about a turn: shown as a notice only
      const failed = { ...state.exchanges[waiting], failed: true, answerDone: true };
      return { ...state, exchanges: state.exchanges.map((x, i) => (i === waiting ? failed : x)) };
    }
  }
}

export function conversationReducer(state: Conversation, action: ConversationAction): Conversation {
  switch (action.type) {
    case "server":
      return applyEvent(state, action.event);
    case "typed":
      return {
        ...state,
        exchanges: [...state.exchanges, newExchange(state, { user: action.text, userFinal: true })],
        nextKey: state.nextKey + 1,
      };
    case "heard":
      return hasTurn(state, action.turn)
        ? updateTurn(state, action.turn, false, () => ({ heardChars: action.chars }))
        : state;
    case "clientLatency":
      return hasTurn(state, action.turn)
        ? updateTurn(state, action.turn, true, () => ({ clientLatencyMs: action.ms }))
        : state;
    case "clear": {
      const turns = state.exchanges.filter((x) => x.session === state.session).map((x) => x.turn ?? 0);
      return { ...state, exchanges: [], clearedThrough: Math.max(state.clearedThrough, ...turns) };
    }
  }
}
