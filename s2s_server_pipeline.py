#!/usr/bin/env python3
"""Real-time speech-to-speech voice agent server, in one file.

    python s2s_server_pipeline.py                     # a small local LLM (Qwen2.5-0.5B-Instruct, downloaded once)
    LLM_API_KEY=sk-... python s2s_server_pipeline.py \\
        --lm_model_url https://api.deepseek.com --lm_model_name deepseek-chat   # any OpenAI-compatible chat API
    python s2s_server_pipeline.py --llm echo          # hear your own words back: checks mic, VAD, ASR, TTS

Data flow. One asyncio loop owns the sockets and the sessions and never runs a model; every model runs in a
worker thread:

    browser ──ws :9001──▶ Session: VAD ──▶ ASR ──▶ LLM ──▶ TTS ──▶ Session: output ──ws :9002──▶ browser
                              (utterance)  (text) (chunks) (audio)     (paced)

Every message carries its session and its turn number (CleanS2S's `user_input_count`). When the user starts
a new turn, every message of an older turn is stale: each stage drops stale work where it takes it and stops
a running model call at its next token or audio chunk, and the session's output, the last filter, never
sends an old frame. The file reads in that order: the conversation's flags, messages and turns, hearing,
the stages, ASR, LLM, TTS, the session (which knows no socket), main; then the wire formats and the network
shell, which a fork that swaps a model need not read. To swap a model, subclass ASRHandler, LLMHandler or
TTSHandler (search for "SWAP MODEL HERE"), declare its flags in add_args(), and add the class to
ASR_HANDLERS, LLM_HANDLERS or TTS_HANDLERS; its name becomes a choice of --asr, --llm or --tts.
The wire protocol is in docs/protocol.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import copy
import gc
import dataclasses
import enum
import errno
import functools
import hashlib
import hmac
import http
import http.server
import importlib
import inspect
import io
import ipaddress
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import resource
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

logger = logging.getLogger("s2s")

SAMPLE_RATE = 16000  # Hz; every stage works on 16 kHz mono, in and out
PROTOCOL_VERSION = 3  # of the extended protocol, docs/protocol.md
PAUSING_PROTOCOL = 3  # the version whose clients hold an answer's playback on a pause event


def now() -> float:
    """The one clock of the server, in seconds (monotonic)."""
    return time.monotonic()


def require(module: str, install: str) -> Any:
    """Import an optional package, or stop start-up with one sentence saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"{module} is not installed ({exc}): {install}") from None


# ------------------------------------------------------------------------------------------------
# Configuration: the conversation's flags. Each model's are beside its handler (add_args), the network's in the
# network shell; --help lists them all, each with its default.
# ------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your answers are spoken aloud, so keep them short and "
    "conversational, use no lists, markdown, emoji or URLs, and answer in the language the user speaks."
)
# The LLM when no flag or key names one: small enough to answer faster than it is spoken on two CPU cores, and
# trained on Chinese and English (bench/local_llm.py; figures in the README, "Which local LLM").
DEFAULT_LOCAL_LLM = "Qwen/Qwen2.5-0.5B-Instruct"


# What a listener says to show they listen, without taking the turn (--backchannels).
BACKCHANNELS = ("嗯", "嗯哼", "对", "好", "好的", "是", "是的", "行", "哦", "噢", "啊", "uh-huh", "mhm", "mm", "hmm", "yeah",
                "yes", "yep", "okay", "ok", "right", "sure", "i see")


def add_hearing_args(p: argparse.ArgumentParser) -> None:
    """How the server hears the user: the VAD, and what counts as speech (Listener, VADSegmenter)."""
    hear = p.add_argument_group("hearing")
    hear.add_argument("--vad", choices=sorted(VAD_MODELS), default="silero", help="VAD model")
    hear.add_argument("--vad_thresh", type=float, default=0.5, help="speech probability above which a window is speech (silero)")
    hear.add_argument("--webrtc_mode", type=int, choices=[0, 1, 2, 3], default=3, help="webrtcvad aggressiveness, 3 rejects most noise")
    hear.add_argument("--min_speech_ms", type=int, default=200,
                      help="speech needed before a turn starts; shorter sounds are ignored. With interruption on, this much speech interrupts the assistant")
    hear.add_argument("--speech_pad_ms", type=int, default=200, help="audio kept before and after the speech in each utterance")
    hear.add_argument("--max_speech_ms", type=int, default=30000, help="an utterance longer than this is cut and answered")
    hear.add_argument("--sample_rate", type=int, default=SAMPLE_RATE, help="sample rate of the client's audio in Hz; resampled to 16000")
    hear.add_argument("--chunk_size", type=int, default=2048,
                      help="accepted for CleanS2S launch commands; ignored (the VAD window is fixed by the model: 512 samples silero, 480 webrtc)")


def add_turn_args(p: argparse.ArgumentParser) -> None:
    """What ends the user's turn, and the tentative answer started before it ends (VADSegmenter, Speculation)."""
    turn = p.add_argument_group("turn-taking")
    turn.add_argument("--min_silence_ms", type=int, default=600,
                      help="--turn_detection silence: the end-of-turn wait, silence after speech before the server answers")
    turn.add_argument("--turn_detection", choices=["silence", "smart_turn"], default="silence",
                      help="what ends the user's turn: silence (--min_silence_ms of it), or smart_turn: at a pause of --turn_pause_ms, "
                           "the Smart Turn model hears whether the turn is complete; if not, the server waits on, up to "
                           "--max_turn_silence_ms (README: Smart Turn)")
    turn.add_argument("--turn_pause_ms", type=int, default=200, help="--turn_detection smart_turn: the pause after which the model is asked")
    turn.add_argument("--turn_reask_ms", type=int, default=300,
                      help="--turn_detection smart_turn: while the silence goes on after an 'unfinished', ask again every this many ms "
                           "(the model hears the silence too); 0 asks again only at the next pause")
    turn.add_argument("--max_turn_silence_ms", type=int, default=2000,
                      help="--turn_detection smart_turn: silence that ends the turn, whatever the model said")
    turn.add_argument("--smart_turn_model", default="",
                      help="--turn_detection smart_turn: the Smart Turn v3 ONNX file; default: the one the pipecat-ai wheel ships "
                           "(pip install --no-deps pipecat-ai==1.14.0)")
    turn.add_argument("--smart_turn_threshold", type=float, default=0.5,
                      help="--turn_detection smart_turn: the probability from which the model's answer is 'complete'")
    turn.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                      help="at a pause of --speculate_pause_ms, answer what the user said so far, sending nothing: if the pause "
                           "ends the turn, the answer goes out at once; if the user speaks on, it is dropped unheard (its LLM "
                           "request wasted; the metrics count them). Off with a streaming ASR or --interrupt_at speech_end")
    turn.add_argument("--speculate_pause_ms", type=int, default=100,
                      help="--speculate: the pause in the user's speech at which a tentative answer starts")
    turn.add_argument("--continue_turn_ms", type=int, default=900,
                      help="speech that cuts off an answer of which the user has heard less than this many ms carries on their "
                           "turn (a thinking pause taken for its end): the LLM answers both utterances as one question, and the "
                           "cut answer leaves the history; 0: it is always a new question")


def add_answer_args(p: argparse.ArgumentParser) -> None:
    """The assistant's side: when the user cuts it off (Session, CutIn), how far its audio runs ahead of the client's
    playback (Speaker), how much history the LLM sees (ChatHistory)."""
    answer = p.add_argument_group("answering: barge-in, playback, history")
    answer.add_argument("--interrupt_at", choices=["speech_start", "speech_end"], default="speech_start",
                        help="when new speech cuts the assistant off: speech_start (after --min_speech_ms of it) or speech_end "
                             "(once the utterance is complete, as CleanS2S did; the turn starts there too)")
    answer.add_argument("--enable_interruption", action=argparse.BooleanOptionalAction, default=True,
                        help="barge-in: user speech while the assistant answers stops the answer at once; --no-enable_interruption ignores speech while the assistant speaks")
    answer.add_argument("--backchannels", default=",".join(BACKCHANNELS),
                        help="words that, said alone while the assistant speaks, do not cut it off (comma-separated; repeated, as "
                             "'嗯嗯' or 'yeah yeah', too): an extended client's answer pauses as soon as the user speaks, and goes on "
                             "where it stopped if the speech was one of these, or a sound with no words (a cough); anything else "
                             "cuts it off. Empty: any speech cuts it off at once, as CleanS2S's client always is")
    answer.add_argument("--backchannel_max_ms", type=int, default=1000,
                        help="--backchannels: speech longer than this while the assistant speaks cuts it off, whatever its words")
    answer.add_argument("--playback_lead_ms", type=int, default=1000,
                        help="send answer audio at most this far ahead of the client's playback, so a barge-in drops the rest; 0 sends audio as soon as it is made")
    answer.add_argument("--chat_size", type=int, default=8,
                        help="most user/assistant exchanges of history sent to the LLM; when full, the older half is dropped at once, "
                             "so the prompt's start stays the same for several turns and prompt caches keep serving it")


def build_parser() -> argparse.ArgumentParser:
    """Every flag. The conversation's are here; each model's beside its handler (add_args), so a forked handler
    brings its own; the network's with the network shell, at the end of the file (add_network_args)."""
    p = argparse.ArgumentParser(
        prog="s2s_server_pipeline.py",
        description="Real-time speech-to-speech voice agent server (VAD -> ASR -> LLM -> TTS over two WebSockets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_hearing_args(p)
    add_turn_args(p)
    add_answer_args(p)
    models = p.add_argument_group("every model")
    models.add_argument("--device", default="auto",
                        help="torch device of the local models (FunASR, transformers, the RAG agent's embedder): auto (cuda when present), cuda, cuda:1, cpu")
    models.add_argument("--speech_api_timeout_s", type=float, default=30.0,
                        help="--asr openai and --tts openai: seconds to wait for the API to connect or send more")

    asr = p.add_argument_group("ASR")
    asr.add_argument("--asr", choices=sorted(ASR_HANDLERS), default="funasr", help="ASR backend")
    add_handler_args(asr, ASR_HANDLERS)
    llm = p.add_argument_group("LLM")
    llm.add_argument("--llm", choices=sorted(LLM_HANDLERS), default=None,
                     help="LLM backend: openai is any OpenAI-compatible chat API, key from LLM_API_KEY; transformers runs a local "
                          "chat model; echo repeats what it heard (a microphone check). Default: openai with --enable_llm_api or "
                          "--lm_model_url, transformers with --lm_model_name alone (as CleanS2S), else openai when LLM_API_KEY "
                          f"is set, else transformers with {DEFAULT_LOCAL_LLM} (downloaded on first run)")
    llm.add_argument("--enable_llm_api", action="store_true", help="CleanS2S's way to say --llm openai")
    add_handler_args(llm, LLM_HANDLERS)
    tts = p.add_argument_group("TTS")
    tts.add_argument("--tts", choices=sorted(TTS_HANDLERS), default=None,
                     help="TTS backend: espeak (no GPU, no download), cosyvoice (voice cloning), openai (any OpenAI-compatible speech API). "
                          "Default, as CleanS2S: cosyvoice with --tts_model_name, else espeak")
    add_handler_args(tts, TTS_HANDLERS)
    add_network_args(p)
    return p


def add_handler_args(group: argparse._ArgumentGroup, registry: dict) -> None:
    """The flags of every handler a stage can choose, each declared once, by the class that defines add_args()."""
    done: set = set()
    for handler in registry.values():
        for cls in reversed(handler.__mro__):
            if "add_args" in vars(cls) and cls not in done:
                done.add(cls)
                cls.add_args(group)


# ------------------------------------------------------------------------------------------------
# Messages between stages. Each carries its session and turn, so any stage can tell stale work.
# ------------------------------------------------------------------------------------------------

@dataclass
class Utterance:  # Receiver -> ASR
    session: Session
    turn: int
    audio: np.ndarray  # float32 PCM, 16 kHz mono: the whole utterance, or for a streaming ASR the next piece
    final: bool = True  # the user's turn has ended


@dataclass
class UserText:  # ASR (or typed text) -> LLM
    session: Session
    turn: int
    text: str


@dataclass
class AnswerText:  # LLM -> TTS: one speakable chunk
    session: Session
    turn: int
    seq: int
    text: str
    last: bool
    feed: Optional[TextFeed] = None  # --tts_text_stream: the rest of the answer, as the LLM writes it


class TextFeed:
    """LLM text handed to a TTS that reads text while it speaks (CosyVoice2/3): the LLM thread put()s pieces,
    the TTS iterates pieces() and learns, with take_read(), which text it has read since last asked."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.read, self.lock = [], threading.Lock()

    def put(self, text: str) -> None:
        self.queue.put(text)

    def close(self) -> None:
        self.queue.put(None)

    def pieces(self) -> Iterator[str]:
        while (text := self.queue.get()) is not None:
            with self.lock:
                self.read.append(text)
            yield text

    def take_read(self) -> str:
        with self.lock:
            text, self.read = "".join(self.read), []
        return text


@dataclass
class AnswerAudio:  # TTS -> Session -> client
    session: Session
    turn: int
    seq: int
    text: str  # the chunk's text on its first piece of audio, "" on the rest
    pcm: bytes  # int16 little-endian PCM, 16 kHz mono; empty on the item that ends a chunk
    last: bool  # the end of the answer
    question: Optional[str] = None  # a spoken turn's transcript, on the first piece that goes out (for CleanS2S's client)


# Events for clients of the extended protocol (docs/protocol.md). Legacy clients never see them.

@dataclass
class ServerEvent:
    event: ClassVar[str] = ""
    extended: ClassVar[bool] = True  # a message of the extended protocol; False: for the OpenAI Realtime adapter only

    def to_json(self) -> str:
        return json.dumps({"event": self.event, **dataclasses.asdict(self)}, ensure_ascii=False)


@dataclass
class ReadyEvent(ServerEvent):  # on the sender socket: the session's events and audio follow
    event: ClassVar[str] = "ready"
    uid: str
    protocol: int = PROTOCOL_VERSION
    sample_rate: int = SAMPLE_RATE


@dataclass
class SessionReadyEvent(ReadyEvent):  # on the receiver socket: the session is open; its key opens the sender
    session_key: str = ""
    resumed: bool = False  # an earlier connection's session, kept for --resume_s, goes on


@dataclass
class SpeechStartEvent(ServerEvent):
    event: ClassVar[str] = "speech_start"
    turn: int


@dataclass
class SpeechEndEvent(ServerEvent):  # the user's turn has ended: its utterance goes to the ASR
    event: ClassVar[str] = "speech_end"
    extended: ClassVar[bool] = False
    turn: int


@dataclass
class InterruptEvent(ServerEvent):
    event: ClassVar[str] = "interrupt"
    turn: int  # the turn whose audio must stop playing now


@dataclass
class PauseEvent(ServerEvent):  # the user speaks over the answer: hold its playback, keeping what is queued
    event: ClassVar[str] = "pause"
    turn: int


@dataclass
class ResumeEvent(ServerEvent):  # it was a backchannel or a noise: play on from where playback stopped
    event: ClassVar[str] = "resume"
    turn: int
    heard: str = ""  # the backchannel's words; empty for a sound with none


@dataclass
class TranscriptEvent(ServerEvent):
    event: ClassVar[str] = "transcript"
    turn: int
    text: str
    final: bool = True
    continues: Optional[int] = None  # the turn whose question these words carry on (--continue_turn_ms)


@dataclass
class MetricsEvent(ServerEvent):
    event: ClassVar[str] = "metrics"
    turn: int
    metrics: dict


@dataclass
class ToolCallEvent(ServerEvent):  # the LLM calls a function the client offered (Session.tools): a piece of the call
    event: ClassVar[str] = "tool_call"
    extended: ClassVar[bool] = False
    turn: int
    index: int  # of the call in the answer
    call_id: str
    name: str
    arguments: str  # the next piece of its JSON arguments
    done: bool = False  # the call is whole: `arguments` is all of them


@dataclass
class ErrorEvent(ServerEvent):
    event: ClassVar[str] = "error"
    code: str
    message: str
    turn: Optional[int] = None


# ------------------------------------------------------------------------------------------------
# Turns: what happened in each turn, its timings, and the conversation history built from them.
# ------------------------------------------------------------------------------------------------

def settle(future: concurrent.futures.Future) -> None:
    """Resolve a future that may be resolved already (by another thread)."""
    try:
        future.set_result(True)
    except concurrent.futures.InvalidStateError:
        pass


class TurnState(enum.Enum):
    """A turn's life. Turn.move() makes these moves and no others:

        HEARING ──▶ ANSWERING ──▶ SPEAKING ──▶ SENT       the user's words, the models at work, the answer going out
        HEARING, ANSWERING, SPEAKING ──▶ FAILED ──▶ SENT   a stage raised: no stage works on it any more, its end goes out
        HEARING, ANSWERING ──▶ SENT                        nothing to answer (an empty answer, "new topic")
        every state but INTERRUPTED ──▶ INTERRUPTED        the user cut in (SENT: while it still played), or the client left
    """
    HEARING = "hearing"  # the user is speaking (a typed turn starts answering at once)
    ANSWERING = "answering"  # the user's turn has ended; nothing of the answer has gone out yet
    SPEAKING = "speaking"  # part of the answer has gone out
    FAILED = "failed"  # a stage raised; what it made before still goes out, then the answer's end
    SENT = "sent"  # all of the answer has gone out (it may still be playing); its figures are reported
    INTERRUPTED = "interrupted"  # cut off; its figures are reported


TURN_MOVES = {
    TurnState.HEARING: {TurnState.ANSWERING, TurnState.FAILED, TurnState.SENT, TurnState.INTERRUPTED},
    TurnState.ANSWERING: {TurnState.SPEAKING, TurnState.FAILED, TurnState.SENT, TurnState.INTERRUPTED},
    TurnState.SPEAKING: {TurnState.SENT, TurnState.FAILED, TurnState.INTERRUPTED},
    TurnState.FAILED: {TurnState.SENT, TurnState.INTERRUPTED},
    TurnState.SENT: {TurnState.INTERRUPTED},
    TurnState.INTERRUPTED: set(),
}


@dataclass
class TurnTimes:
    """When each step of a turn happened (now(), in s), for its metrics."""
    speech_end: Optional[float] = None  # end of speech detected, after the end-of-turn wait (text: received)
    speculated_at: Optional[float] = None  # --speculate: when the answer started, at a pause before speech_end
    eot_wait_ms: float = 0.0  # silence waited before speech_end, and the turn model's time to decide
    turn_model_ms: Optional[float] = None  # that time to decide alone (--turn_detection smart_turn)
    transcript: Optional[float] = None
    llm_first_token: Optional[float] = None
    llm_first_chunk: Optional[float] = None  # the first speakable chunk went to the TTS
    tts_first_audio: Optional[float] = None
    first_audio_sent: Optional[float] = None
    barge_in_ms: Optional[float] = None  # new speech first heard -> interrupt sent, when this turn was cut off
    answer_heard_ms: Optional[float] = None  # cut off: its first audio sent -> the speech (or text) that cut it (0: none sent)
    extra_ms: dict = field(default_factory=dict)  # timings of steps a forked handler adds (the RAG agent's lookup_ms)

    def metrics(self) -> dict:
        """Stage timings in ms, each from the previous milestone, and the voice-to-voice total."""
        def ms(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return None if a is None or b is None else round((b - a) * 1000, 1)
        return {
            "eot_wait_ms": round(self.eot_wait_ms, 1),
            "turn_model_ms": None if self.turn_model_ms is None else round(self.turn_model_ms, 1),
            "speculated_ms": ms(self.speculated_at, self.speech_end),  # how far ahead of the turn's end it started
            "asr_ms": ms(self.speculated_at or self.speech_end, self.transcript),
            "llm_first_token_ms": ms(self.transcript or self.speech_end, self.llm_first_token),
            "llm_first_chunk_ms": ms(self.llm_first_token, self.llm_first_chunk),
            "tts_first_audio_ms": ms(self.llm_first_chunk, self.tts_first_audio),
            "send_ms": ms(self.tts_first_audio, self.first_audio_sent),
            "first_audio_ms": ms(self.speech_end, self.first_audio_sent),
            "barge_in_ms": self.barge_in_ms,
            "answer_heard_ms": self.answer_heard_ms,
            **self.extra_ms,
        }


@dataclass
class Turn:
    """One turn: the user's words, the answer as it went out, and where it is in its life (state); its timings
    apart, in `times`."""
    number: int
    spoken: bool
    question: str = ""
    answer_chunks: list = field(default_factory=list)  # (start_ms in the answer audio, text) of every chunk sent
    answer_audio: list = field(default_factory=list)  # int16 PCM bytes sent
    audio_sent_ms: float = 0.0
    played_ms: Optional[float] = None  # reported by an extended client
    asr_state: dict = field(default_factory=dict)  # a streaming ASR's cache for this utterance
    heard_audio: Optional[np.ndarray] = None  # the utterance as the VAD cut it (float32, 16 kHz), for --save_data
    state: TurnState = TurnState.HEARING
    messages_sent: int = 0  # answer messages that went to the clients
    resumed: int = 0  # times its playback paused for speech that proved a backchannel or a noise, and went on
    llm_requests: int = 0  # answers asked of the LLM for it
    usage: dict = field(default_factory=dict)  # its LLM request's token counts, where the LLM reports them
    # --speculate: its answer was started at a pause, before the turn was known to be over; earlier tentative answers
    # to the same utterance were dropped because the user spoke on, and cost this many LLM requests.
    speculated: bool = False
    speculations_discarded: int = 0
    llm_requests_discarded: int = 0
    # --continue_turn_ms: the user spoke on over the answer to `continues` having heard little of it, so this turn's
    # question carries on that one's, which leaves the history (carried_on).
    continues: Optional[Turn] = None
    carried_on: bool = False
    times: TurnTimes = field(default_factory=TurnTimes)
    notes: dict = field(default_factory=dict)  # what a forked handler keeps with the turn (what the RAG agent found)
    # Resolved when the turn goes stale (a new turn, or the client left). A stage that waits on something slow
    # (a web lookup) waits on this too, with concurrent.futures.wait(), and gives up at once on a barge-in.
    cancelled: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def move(self, to: TurnState) -> bool:
        """Take a move TURN_MOVES allows, and say whether it was one (a turn already past it stays as it is)."""
        if to not in TURN_MOVES[self.state]:
            return False
        self.state = to
        return True

    @property
    def over(self) -> bool:
        """Nothing more of it goes out: all of it went, or it was cut off."""
        return self.state in (TurnState.SENT, TurnState.INTERRUPTED)

    def cancel(self) -> None:
        settle(self.cancelled)

    def heard_text(self) -> str:
        """The answer as far as the user heard it: chunks played (when the client reports it) or sent."""
        limit = self.played_ms if self.played_ms is not None else float("inf")
        return "".join(text for start_ms, text in self.answer_chunks if start_ms <= limit)

    def metrics(self) -> dict:
        return {**self.times.metrics(), "interrupted": self.state is TurnState.INTERRUPTED, "resumed": self.resumed,
                "speculated": self.speculated, "speculations_discarded": self.speculations_discarded,
                "llm_requests_discarded": self.llm_requests_discarded,
                "continues": None if self.continues is None else self.continues.number}


INTERRUPTED_MARK = " [interrupted by the user]"


class ChatHistory:
    """The conversation an LLM sees. Written by the LLM thread (questions) and the loop (answers as sent)."""

    def __init__(self, max_exchanges: int):
        self.max_exchanges = max_exchanges
        self.exchanges: list = []  # Turn objects, oldest first
        self.lock = threading.Lock()

    def add(self, turn: Turn) -> None:
        with self.lock:
            self.exchanges.append(turn)
            if len(self.exchanges) > max(1, self.max_exchanges):
                # Drop the older half at once, not one exchange a turn: the prompt then starts the same way for
                # several turns, so what the model has cached of it (the local LLM's prefix cache, an API's prompt
                # cache) still serves, and only one turn in max_exchanges/2 reads the whole history again.
                del self.exchanges[:max(1, self.max_exchanges // 2)]

    def clear(self) -> None:
        with self.lock:
            self.exchanges.clear()

    def drop(self, turn: Turn) -> None:
        """Take back a turn added for a tentative answer that was dropped (--speculate)."""
        with self.lock:
            self.exchanges = [t for t in self.exchanges if t is not turn]

    def past(self) -> list:
        """The turns whose exchanges the LLM sees, oldest first: those with an answer (one cut off before a word
        has its mark), since many chat templates refuse two user messages in a row (a failed model call has none),
        and whose question no later turn carried on."""
        with self.lock:
            kept = list(self.exchanges) if self.max_exchanges > 0 else []
        return [t for t in kept if not t.carried_on and (t.state is TurnState.INTERRUPTED or t.heard_text())]

    def messages(self, role: str, prompt: str, question: str) -> list:
        """OpenAI-style messages: the opening prompt, past exchanges, then the new question."""
        msgs = [{"role": role, "content": prompt}] if prompt else []
        for t in self.past():
            answer = t.heard_text() + (INTERRUPTED_MARK if t.state is TurnState.INTERRUPTED else "")
            msgs += [{"role": "user", "content": t.question}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": question})
        return msgs


# ------------------------------------------------------------------------------------------------
# Hearing: voice activity detection turns a stream of audio into utterances.
# ------------------------------------------------------------------------------------------------


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> int16 little-endian bytes."""
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def from_pcm16(pcm: bytes) -> np.ndarray:
    """int16 little-endian bytes -> float32 [-1, 1]."""
    audio = np.frombuffer(pcm, "<i2").astype(np.float32)
    audio *= 1 / 32768  # in place: one array a message, not two
    return audio


class SileroVAD:
    """silero-vad through onnxruntime. One model is shared by every session; each stream keeps its own state."""

    window = 512  # samples per call at 16 kHz (32 ms), fixed by the model
    context = 64  # samples of the previous window the model expects in front of each window

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.session = None

    def setup(self) -> None:
        import importlib.resources
        onnxruntime = require("onnxruntime", "pip install onnxruntime silero-vad")
        require("silero_vad", "pip install silero-vad")
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1  # a window takes ~0.1 ms; more threads only add overhead
        opts.intra_op_num_threads = 1
        path = importlib.resources.files("silero_vad.data").joinpath("silero_vad.onnx")
        self.session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def new_state(self) -> dict:
        return {"state": np.zeros((2, 1, 128), np.float32), "context": np.zeros((1, self.context), np.float32)}

    def speech_probs(self, states: list, streams: list) -> list:
        """The probability of each window (float32, 512 samples) of each stream, its state carried from one window to
        the next: one model call a step, with the next window of every stream that has one (the model takes a batch:
        input [B, 576], state [2, B, 128]). A call costs ~0.1 ms with one window, ~0.06 ms a window with 16 or more.
        The streams are gathered into one array once, longest first, so that a step's streams are its first rows."""
        order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))
        lengths = [len(streams[i]) for i in order]
        steps = lengths[0] if lengths else 0
        if steps == 0:
            return [[] for _ in streams]
        windows = np.zeros((len(order), steps, self.window), np.float32)  # [stream, step, sample]
        for row, i in enumerate(order):
            windows[row, :lengths[row]] = streams[i]
        x = np.empty((len(order), self.context + self.window), np.float32)  # the model's input: context, then window
        x[:, :self.context] = np.concatenate([states[i]["context"] for i in order])
        state = np.concatenate([states[i]["state"] for i in order], axis=1)
        probs = np.empty((len(order), steps), np.float32)
        rows = len(order)
        sr = np.array(SAMPLE_RATE, np.int64)
        for k in range(steps):
            while lengths[rows - 1] <= k:  # the shortest streams have ended
                rows -= 1
            if k:
                x[:rows, :self.context] = windows[:rows, k - 1, -self.context:]
            x[:rows, self.context:] = windows[:rows, k]
            out, new_state = self.session.run(None, {"input": x[:rows], "state": np.ascontiguousarray(state[:, :rows]), "sr": sr})
            probs[:rows, k], state[:, :rows] = out[:, 0], new_state
        answer: list = [[] for _ in streams]
        for row, i in enumerate(order):
            if lengths[row]:
                states[i]["state"] = state[:, row:row + 1].copy()
                states[i]["context"] = windows[row, lengths[row] - 1:lengths[row], -self.context:].copy()
                answer[i] = probs[row, :lengths[row]].tolist()
        return answer


class WebRTCVAD:
    """webrtcvad (package webrtcvad-wheels): a speech / no-speech decision per 30 ms frame."""

    window = 480  # samples (30 ms)
    threshold = 0.5  # its decisions are 0 or 1

    def __init__(self, mode: int):
        self.mode = mode

    def setup(self) -> None:
        self.webrtcvad = require("webrtcvad", "pip install webrtcvad-wheels")

    def new_state(self) -> Any:
        return self.webrtcvad.Vad(self.mode)

    def speech_probs(self, states: list, streams: list) -> list:
        return [[1.0 if s.is_speech(to_pcm16(w), SAMPLE_RATE) else 0.0 for w in windows] for s, windows in zip(states, streams)]


VAD_MODELS = {"silero": SileroVAD, "webrtc": WebRTCVAD}


@dataclasses.dataclass
class VADRequest:
    """One session's windows for the VAD's next round, and what to do with their probabilities (or with the exception
    its input raised) once the round has them; not heard at all if its session no longer wants it by then."""
    state: Any
    windows: list | np.ndarray
    then: Callable[[list | Exception], None]
    wanted: bool = True  # False: its client left before its round


class VADBatcher:
    """The VAD of every session at once. A VAD call costs mostly the call, not the window (silero: ~0.1 ms for one
    window, ~0.06 ms a window in a batch of 16), so the windows of every session that has some ready go to the model
    together, each session keeping its own state. Nobody waits for a batch to fill: a round starts as soon as the
    one before it is done, with whatever arrived meanwhile; a session alone has its windows heard at once. Each
    session's decisions are made in the round that computes its probabilities (its request's `then`): a microphone
    frame is decided on one turn of the event loop after its message is read. (A task a session and a future a round
    took two turns more, each as long as everything else the loop had to do, at 150 sessions ~200 ms.)

    The rounds run on the event loop, at most MAX_BATCH sessions at a time (~8 ms of model time), letting the loop
    read sockets between them. On a thread of its own the model would have to win Python's lock back from the busy
    loop after every call: at 100 sessions on 2 cores that cost 23% of a core more and four times the turns' median
    overhead."""

    MAX_BATCH = 64  # sessions in one round

    def __init__(self, model: Any):
        self.model = model
        self.waiting: list = []  # VADRequests for the next round, in the order they came
        self.drainer: Optional[asyncio.Task] = None  # runs rounds while requests wait

    def hear(self, request: VADRequest) -> None:
        """Into the next round; request.then() gets the probability of each of its windows, in order."""
        self.waiting.append(request)
        if self.drainer is None:
            self.drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.waiting:
                await asyncio.sleep(0)  # the loop reads the sockets that are ready: their audio joins this round
                batch = [r for r in self.waiting[:self.MAX_BATCH] if r.wanted]
                del self.waiting[:self.MAX_BATCH]
                if batch:
                    for request, outcome in zip(batch, self.run([(r.state, r.windows) for r in batch])):
                        try:
                            request.then(outcome)
                        except Exception:  # one session's decisions never stop the others'
                            logger.exception("a session failed to act on its VAD round")
        finally:
            self.drainer = None

    def run(self, batch: list) -> list:
        """(state, windows) of each session -> its probabilities, or the exception its input raised: one batch for
        all; if that fails, one session at a time, so that only the session whose input failed gets the error."""
        try:
            return self.model.speech_probs([state for state, _ in batch], [windows for _, windows in batch])
        except Exception:
            return [self._alone(state, windows) for state, windows in batch]

    def _alone(self, state: Any, windows: list | np.ndarray) -> list | Exception:
        try:
            return self.model.speech_probs([state], [windows])[0]
        except Exception as exc:
            return exc


class SmartTurn:
    """Smart Turn v3 (pipecat-ai's end-of-turn model, BSD-2 licence, 23 languages, Mandarin and English among
    them): from the last 8 s of an utterance, the probability that the speaker has finished their turn, heard in
    how they speak, not in what. 8 M parameters, about 50 ms a call on one CPU thread; one model serves every
    session. Its features are Whisper's log-mel (80 bins, normalised), computed by transformers."""

    WINDOW = 8 * SAMPLE_RATE  # samples: the model hears the last 8 s, zero-padded in front when shorter
    BUNDLED = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"  # inside the pipecat-ai wheel

    def __init__(self, path: str = "", threshold: float = 0.5):
        self.path, self.threshold = path, threshold

    def setup(self) -> None:
        onnxruntime = require("onnxruntime", "pip install onnxruntime")
        transformers = require("transformers", "pip install transformers")
        self.path = self.path or bundled_smart_turn()
        if not os.path.isfile(self.path):
            raise SystemExit(f"--smart_turn_model {self.path} does not exist")
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1  # a call is short, and the VAD's thread pool runs several at once
        opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.features = transformers.WhisperFeatureExtractor(chunk_length=self.WINDOW // SAMPLE_RATE)

    def warmup(self) -> None:
        self.probability(np.zeros(SAMPLE_RATE, np.float32))

    def describe(self) -> str:
        return f"Smart Turn {os.path.basename(self.path)}, complete from {self.threshold:g}"

    def probability(self, audio: np.ndarray) -> float:
        """P(the turn is complete) for an utterance so far (float32, 16 kHz mono)."""
        audio = audio[-self.WINDOW:]
        audio = np.pad(audio, (self.WINDOW - len(audio), 0))
        x = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", do_normalize=True).input_features
        return float(self.session.run(None, {"input_features": x.astype(np.float32)})[0].reshape(-1)[0])

    def is_complete(self, audio: np.ndarray) -> bool:
        return self.probability(audio) >= self.threshold


def bundled_smart_turn() -> str:
    """The model file the pipecat-ai wheel ships, found without importing pipecat (none of its dependencies are
    needed: pip install --no-deps pipecat-ai)."""
    import importlib.metadata
    try:
        files = importlib.metadata.files("pipecat-ai") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f) == SmartTurn.BUNDLED:
            return str(f.locate())
    raise SystemExit("--turn_detection smart_turn needs the Smart Turn model: pip install --no-deps pipecat-ai==1.14.0 "
                     "(it ships the file; none of pipecat is imported), or give --smart_turn_model PATH")


@dataclass
class SpeechStarted:
    heard_at: float  # when the first speech window of this utterance arrived


@dataclass
class SpeechPaused:  # --speculate: the user paused; the turn may be over
    audio: np.ndarray  # float32 PCM, 16 kHz mono: the utterance so far, as SpeechEnded would cut it here
    speech_ms: float  # voice heard in the utterance so far: any more means the user spoke on


@dataclass
class TurnQuestion:  # --turn_detection smart_turn: the silence is long enough to ask the turn model
    audio: np.ndarray  # float32 PCM, 16 kHz mono: the utterance so far

    def ask(self, turn_model: SmartTurn) -> tuple:
        """(is the turn complete, ms the model took): ~45 ms of CPU, so the server asks on a worker thread."""
        t0 = now()
        complete = turn_model.is_complete(self.audio)
        return complete, (now() - t0) * 1000


@dataclass
class SpeechEnded:
    audio: np.ndarray  # float32 PCM, 16 kHz mono, speech plus padding
    silence_ms: float  # silence heard before this event (ms of audio)
    turn_model_ms: float  # what asking the turn model took on the ask that ended the turn (0: none was asked)
    untaken: np.ndarray  # the part of the utterance take_new() has not handed out yet
    speech_ms: float  # voice heard in the utterance


class EndOfTurn:
    """When a silence ends the user's turn: after `min_silence_ms` of it; or, with a turn model (SmartTurn), when the
    model calls the turn complete, asked at a pause of `pause_ms` and again every `reask_ms` of silence (0: not until
    the next pause), and after `max_silence_ms` whatever it said."""

    def __init__(self, min_silence_ms: int, turn_model: Optional[SmartTurn] = None, pause_ms: int = 200,
                 max_silence_ms: int = 2000, reask_ms: int = 0):
        self.min_silence_ms, self.turn_model = min_silence_ms, turn_model
        self.pause_ms, self.max_silence_ms, self.reask_ms = pause_ms, max_silence_ms, reask_ms
        self.shortest_ms = pause_ms if turn_model is not None else min_silence_ms  # the shortest pause that can end a turn
        self.asked_at: Optional[float] = None  # the silence (ms) at which the turn model was last asked about this pause

    def speech(self) -> None:
        """The user speaks (again): the next silence is a new pause."""
        self.asked_at = None

    def ends(self, silence_ms: float) -> bool:
        """Does this silence end the turn, whatever a turn model would say?"""
        return silence_ms >= (self.min_silence_ms if self.turn_model is None else self.max_silence_ms)

    def asks(self, silence_ms: float) -> bool:
        """Is this silence a pause to ask the turn model about (not asked about yet, or `reask_ms` ago)? If so, it
        counts as asked."""
        if self.turn_model is None or silence_ms < self.pause_ms:
            return False
        if self.asked_at is not None and (not self.reask_ms or silence_ms - self.asked_at < self.reask_ms):
            return False
        self.asked_at = silence_ms
        return True


class VADSegmenter:
    """Per-session state machine over VAD probabilities: start a turn after `min_speech_ms` of speech, end it when
    the silence after it says so (EndOfTurn). Keeps `speech_pad_ms` of audio on both sides of the speech. A silence
    that asks the turn model ends decide()'s events with a TurnQuestion; answer() goes on. With `speculate_ms`, a
    pause that long that has not ended the turn says so (SpeechPaused), once a pause, so that an answer can start
    before the turn is known to be over."""

    def __init__(self, model: Any, min_speech_ms: int, min_silence_ms: int, speech_pad_ms: int, max_speech_ms: int,
                 turn_model: Optional[SmartTurn] = None, pause_ms: int = 200, max_silence_ms: int = 2000,
                 reask_ms: int = 0, speculate_ms: Optional[int] = None, threshold: Optional[float] = None):
        self.end = EndOfTurn(min_silence_ms, turn_model, pause_ms, max_silence_ms, reask_ms)
        self.speculate_ms = speculate_ms
        self.model = model
        self.state = model.new_state()
        self.window_ms = model.window * 1000 / SAMPLE_RATE
        self.threshold = model.threshold if threshold is None else threshold  # (a Realtime client sets its own)
        self.neg_threshold = max(self.threshold - 0.15, 0.01)  # hysteresis, as silero recommends
        self.min_speech_ms, self.min_silence_ms = min_speech_ms, min_silence_ms
        self.pad_ms, self.max_speech_ms = speech_pad_ms, max_speech_ms
        self.pending = np.zeros(0, np.float32)  # samples waiting for a full window
        self.pre_roll: deque = deque(maxlen=max(1, round(speech_pad_ms / self.window_ms)))
        self.unasked: Optional[tuple] = None  # (windows, probs) of a round after its TurnQuestion, for answer()
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self.windows: list = []  # audio of the utterance under way, including pre-roll
        self.taken = 0  # windows already handed to a streaming ASR
        self.started = False  # min_speech_ms reached: the turn has begun
        self.speech_ms = 0.0
        self.silence_ms = 0.0
        self.loudest = 0.0  # RMS of the loudest speech window so far
        self.heard_at: Optional[float] = None
        self.end.speech()
        self.pause_told = False  # SpeechPaused went out for this pause

    def reset(self) -> None:
        """Forget everything heard so far (used while speech is ignored)."""
        self.state = self.model.new_state()
        self.pending = np.zeros(0, np.float32)
        self.pre_roll.clear()
        self.unasked = None
        self._reset_utterance()

    def split(self, audio: np.ndarray) -> np.ndarray:
        """Float32 16 kHz samples -> the model's windows, a row each; what is left over waits for the next call."""
        buf = np.concatenate([self.pending, audio]) if len(self.pending) else audio
        n = len(buf) // self.model.window * self.model.window
        self.pending = buf[n:].copy()
        return buf[:n].reshape(-1, self.model.window)

    def decide(self, windows: np.ndarray, probs: list) -> list:
        """The windows' speech probabilities (VADBatcher) -> SpeechStarted / SpeechPaused / SpeechEnded events, in order.
        A window that asks the turn model stops there: the last event is then a TurnQuestion, and answer() hears the
        rest of the windows."""
        if self.heard_at is None and max(probs, default=0.0) < self.threshold:  # silence while idle: only the pre-roll
            self.pre_roll.extend(windows)
            return []
        events = []
        for i, (window, prob) in enumerate(zip(windows, probs)):
            event = self._step(window, prob)
            if event is not None:
                events.append(event)
            if isinstance(event, TurnQuestion):
                self.unasked = (windows[i + 1:], probs[i + 1:])
                break
        return events

    def answer(self, complete: bool, model_ms: float) -> list:
        """The turn model's answer to the TurnQuestion that ended decide()'s events; then the events of the windows
        after it."""
        windows, probs = self.unasked
        self.unasked = None
        event = self._ended(model_ms) if complete else self._paused()
        return ([event] if event is not None else []) + self.decide(windows, probs)

    def feed(self, audio: np.ndarray) -> list:
        """split() and decide() for a stream heard alone, the turn model asked where it must (tests, bench/run.py
        --parts vad)."""
        windows = self.split(audio)
        events = self.decide(windows, self.model.speech_probs([self.state], [windows])[0])
        while events and isinstance(events[-1], TurnQuestion):
            events += self.answer(*events.pop().ask(self.end.turn_model))
        return events

    def _step(self, window: np.ndarray, prob: float) -> Any:
        if self.heard_at is None:  # idle: wait for speech
            if prob < self.threshold:
                self.pre_roll.append(window)
                return None
            self.heard_at = now()
            self.windows = list(self.pre_roll)
            self.pre_roll.clear()
        self.windows.append(window)
        if prob >= self.threshold:
            self.speech_ms += self.window_ms
            self.silence_ms = 0.0
            self.end.speech()
            self.pause_told = False
            self.loudest = max(self.loudest, rms(window))
        elif prob < self.neg_threshold:
            if self.silence_ms == 0.0:  # the wait counts from where the voice stopped, not where the VAD noticed
                self.silence_ms = self.quiet_tail() * self.window_ms
            self.silence_ms += self.window_ms
        if not self.started:
            if self.speech_ms >= self.min_speech_ms:
                self.started = True
                return SpeechStarted(self.heard_at)
            if self.silence_ms >= self.min_silence_ms:  # a short sound, not a turn
                self.pre_roll.extend(self.windows[-self.pre_roll.maxlen:])
                self._reset_utterance()
            return None
        too_long = len(self.windows) * self.window_ms >= self.max_speech_ms
        if too_long or self.end.ends(self.silence_ms):
            return self._ended(0.0)
        if self.end.asks(self.silence_ms):
            return TurnQuestion(concat(self.windows))
        return self._paused()

    def _ended(self, model_ms: float) -> SpeechEnded:
        event = SpeechEnded(self._utterance(), self.silence_ms, model_ms, concat(self.windows[self.taken:]), self.speech_ms)
        self._reset_utterance()
        return event

    def _paused(self) -> Optional[SpeechPaused]:
        if self.speculate_ms is not None and not self.pause_told and self.silence_ms >= self.speculate_ms:
            self.pause_told = True
            return SpeechPaused(self._utterance(), self.speech_ms)
        return None

    def _utterance(self) -> np.ndarray:
        """The utterance so far without the silence after it beyond the pad."""
        drop = max(0, round((self.silence_ms - self.pad_ms) / self.window_ms))
        return np.concatenate(self.windows[:len(self.windows) - drop])

    def turn_due_ms(self, at_end: bool) -> Optional[float]:
        """The least audio, in ms, after which the utterance under way could start a turn (at_end: end one, where
        --interrupt_at speech_end starts it); None when none is under way, or its turn has already started."""
        if self.heard_at is None or (self.started and not at_end):
            return None
        to_start = 0.0 if self.started else max(0.0, self.min_speech_ms - self.speech_ms)
        return to_start + (self.end.shortest_ms - (self.silence_ms if self.started else 0.0) if at_end else 0.0)

    def quiet_tail(self) -> int:
        """Windows before this one that were already quiet (26 dB under the utterance's loudest), at most two:
        silero's recurrent state keeps its speech probability up for a window or two after the voice stops."""
        n = 0
        for window in self.windows[-2:-4:-1]:
            if rms(window) >= 0.05 * self.loudest:
                break
            n += 1
        return n

    def take_new(self, min_samples: int) -> Optional[np.ndarray]:
        """Audio of the started utterance not handed out before, once there is at least `min_samples`."""
        if not self.started or (len(self.windows) - self.taken) * self.model.window < min_samples:
            return None
        audio = concat(self.windows[self.taken:])
        self.taken = len(self.windows)
        return audio


def rms(audio: np.ndarray) -> float:
    return math.sqrt(float(np.dot(audio, audio)) / len(audio))  # on a window, an eighth of np.mean(np.square())' time


def concat(windows: list) -> np.ndarray:
    return np.concatenate(windows) if windows else np.zeros(0, np.float32)


def plain(text: str) -> str:
    """Lower case, without spaces, punctuation or emoji: how a transcript is matched against --backchannels."""
    return re.sub(r"[\W_]+", "", text.lower())


def backchannel_pattern(words: str) -> Optional[re.Pattern]:
    """What a transcript that is only backchannels matches once plain(): any of the words, repeated or mixed ('嗯嗯',
    'yeah okay'), or nothing at all (a cough); None when the list is empty."""
    alternatives = sorted({re.escape(plain(w)) for w in words.split(",") if plain(w)}, key=len, reverse=True)
    return re.compile("(?:" + "|".join(alternatives) + ")*") if alternatives else None


class Listener:
    """What one session hears, and the turn-taking that follows from it: the client's audio, resampled to 16 kHz,
    goes through the session's VAD (VADBatcher, with every other session's); a user turn starts when speech starts (with
    --interrupt_at speech_end, when it ends, as CleanS2S did), and the utterance goes to the ASR when the turn
    ends (a streaming ASR hears it in pieces as it comes). With --speculate, a pause in the user's speech starts a
    tentative answer, which the end of the turn takes and more speech drops (Speculation). Speech over an
    answer may pause it instead (the session decides): past --backchannel_max_ms of it, it takes the turn. It
    keeps no reference to its session beyond a VAD round under way (hear() is given it; forget() drops the round)."""

    def __init__(self, args: argparse.Namespace, pipeline: Pipeline):
        self.args, self.pipeline = args, pipeline
        turn_model = pipeline.turn_model if args.turn_detection == "smart_turn" else None
        self.vad = VADSegmenter(pipeline.vad_model, args.min_speech_ms, args.min_silence_ms, args.speech_pad_ms,
                                args.max_speech_ms, turn_model, args.turn_pause_ms, args.max_turn_silence_ms,
                                args.turn_reask_ms, args.speculate_pause_ms if speculates(args, pipeline.asr.handler) else None,
                                args.vad_thresh if args.vad == "silero" else None)
        self.resampler = None
        if args.sample_rate != SAMPLE_RATE:
            import soxr
            # MQ: the passband of the default HQ (to 7.5 kHz of 8), holding back 15 ms of audio where HQ holds 21.
            self.resampler = soxr.ResampleStream(args.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="MQ")
        self.speech_turn = 0  # the turn the utterance under way started (or may start: see Session.cut_in)
        self.backchannels = backchannel_pattern(args.backchannels)
        self.speech_heard_at: Optional[float] = None  # when the VAD first heard the utterance under way
        self.heard_audio_at = 0.0  # when the VAD last took audio from the client
        self.inbox: list = []  # the client's audio (float32, 16 kHz) that the VAD has not heard yet
        self.request: Optional[VADRequest] = None  # the audio in the VAD's next round
        self.deciding = False  # the turn model is being asked, off the loop
        self.all_heard = asyncio.Event()  # nothing in the VAD's round or the turn model: set, once the inbox is heard
        self.all_heard.set()
        self.started = 0  # user turns started since the last caught_up()
        self.failure: Optional[Exception] = None  # what broke hearing; raised to the client's next message
        self.epoch = 0  # forget() counts up: a round heard across it is dropped

    async def hear(self, session: Session, audio: np.ndarray) -> None:
        """Queue the client's audio (float32, --sample_rate). It is heard in the VAD's next round, with all that came
        meanwhile, batched with every other session's (VADBatcher): reading a client's messages never waits for its
        VAD, which under load answers slower than a microphone sends. Waits only while more than MAX_UNHEARD_S of
        audio is still to be heard (the server is overloaded: TCP then holds the client back)."""
        if self.failure is not None:
            raise self.failure
        self.inbox.append(audio if self.resampler is None else self.resampler.resample_chunk(audio))
        if self.all_heard.is_set():
            self._ask(session)
        if self.unheard_ms() > MAX_UNHEARD_S * 1000:
            await self._all_heard()

    def unheard_ms(self) -> float:
        return sum(map(len, self.inbox)) * 1000 / SAMPLE_RATE

    async def caught_up(self) -> int:
        """Wait until the audio queued so far has been heard; returns the user turns it started since the last call."""
        await self._all_heard()
        started, self.started = self.started, 0
        return started

    async def _all_heard(self) -> None:
        await self.all_heard.wait()
        if self.failure is not None:
            raise self.failure

    def _ask(self, session: Session) -> None:
        """The inbox into the VAD's next round."""
        audio, self.inbox = concat(self.inbox), []
        if not self.args.enable_interruption and session.assistant_busy():
            self.vad.reset()  # CleanS2S behaviour: nobody listens while the assistant speaks
            self.all_heard.set()
            return
        self.all_heard.clear()
        try:
            epoch, windows = self.epoch, self.vad.split(audio)
        except Exception as exc:  # (a fork's VAD with another window size, say)
            return self._fail(exc)
        then = functools.partial(self._heard, session, epoch, windows)
        if len(windows) == 0:
            then([])
            return
        self.request = VADRequest(self.vad.state, windows, then)
        self.pipeline.vad.hear(self.request)

    def _heard(self, session: Session, epoch: int, windows: list, probs: list | Exception) -> None:
        """A round's probabilities for the windows: the decisions they make (a few comparisons a window)."""
        self.request = None
        try:
            if isinstance(probs, Exception):
                raise probs
            if epoch != self.epoch:  # the client left meanwhile
                return self._next(session)
            self._decided(session, epoch, self.vad.decide(windows, probs))
        except Exception as exc:
            self._fail(exc)

    def _decided(self, session: Session, epoch: int, events: list) -> None:
        """Act on the events; a question to the turn model (~45 ms of CPU) is asked off the event loop, and its answer
        decides the rest of the round. (Not batched across sessions as the VAD is: its cost is compute, not the call.
        One question alone took 37 ms of model; in batches of 4 and 16, 45 and 48 ms a question.)"""
        self._act(session, events)
        if not events or not isinstance(events[-1], TurnQuestion):
            return self._next(session)
        self.deciding = True
        asked = asyncio.get_running_loop().run_in_executor(self.pipeline.turn_pool, events[-1].ask, self.vad.end.turn_model)
        asked.add_done_callback(functools.partial(self._answered, session, epoch))

    def _answered(self, session: Session, epoch: int, asked: asyncio.Future) -> None:
        self.deciding = False
        try:
            if epoch != self.epoch:  # the client left meanwhile: the VAD has forgotten the question
                return self._next(session)
            failure = asked.exception()
            if failure is not None:  # taken for "not finished": the longest silence still ends the turn
                logger.warning("the turn model failed on session %s: %r", session.tag, failure)
            self._decided(session, epoch, self.vad.answer(*(asked.result() if failure is None else (False, 0.0))))
        except Exception as exc:
            self._fail(exc)

    def _next(self, session: Session) -> None:
        if self.inbox:
            self._ask(session)
        else:
            self.all_heard.set()

    def _fail(self, exc: Exception) -> None:
        """Hearing broke: raised to the client's next message (which closes its connection, 1011)."""
        self.failure, self.inbox = exc, []
        self.all_heard.set()

    def _act(self, session: Session, events: list) -> None:
        """The VAD's events for a round: a turn started, a pause (a tentative answer), the turn's end."""
        self.heard_audio_at = now()
        late = self.args.interrupt_at == "speech_end"  # the turn (and the barge-in) begins when the utterance ends
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self.speech_heard_at = ev.heard_at
            if isinstance(ev, SpeechEnded if late else SpeechStarted):
                self.speech_turn = session.start_spoken_turn(self.speech_heard_at).number
                self.started += 1
            if isinstance(ev, SpeechPaused) and session.is_current(self.speech_turn):
                session.speculation.start(session, ev.audio, ev.speech_ms)
            if isinstance(ev, SpeechEnded):
                self._turn_ends(session, ev)
        if self.vad.heard_at is not None:
            session.speculation.spoke_on(session, self.vad.speech_ms)  # a tentative answer to less than this is dropped
        if session.cut_in.holds(self.speech_turn) and self.vad.speech_ms > self.args.backchannel_max_ms:
            session.cut_in.take_turn(session)  # too long for a backchannel
        self._stream_to_asr(session)
        session.speaker.heard_more()

    def is_backchannel(self, transcript: str) -> bool:
        return self.backchannels is not None and self.backchannels.fullmatch(plain(transcript)) is not None

    def _turn_ends(self, session: Session, ev: SpeechEnded) -> None:
        if not session.wants(self.speech_turn):  # typed text in the middle of the speech took over the turn
            return
        t = session.turn_record(self.speech_turn)
        t.times.speech_end, t.times.eot_wait_ms, t.heard_audio = now(), ev.silence_ms + ev.turn_model_ms, ev.audio
        t.times.turn_model_ms = ev.turn_model_ms if self.vad.end.turn_model is not None else None
        session.speech_ended(t)
        if session.speculation.take(session, ev.speech_ms):  # its answer goes out now: the user said nothing more
            return
        t.move(TurnState.ANSWERING)
        asr = self.pipeline.asr
        asr.put(Utterance(session, t.number, ev.untaken if asr.handler.streaming else ev.audio))

    def _stream_to_asr(self, session: Session) -> None:
        asr = self.pipeline.asr
        if asr.handler.streaming and self.args.interrupt_at != "speech_end" and session.is_current(self.speech_turn):
            piece = self.vad.take_new(asr.handler.piece_samples)
            if piece is not None:
                asr.put(Utterance(session, self.speech_turn, piece, final=False))

    def forget(self) -> None:
        """The client is gone: an utterance cut off with its connection is not continued by the next one's audio."""
        self.inbox, self.epoch = [], self.epoch + 1
        if self.request is not None:  # not heard at all: its round skips it
            self.request.wanted, self.request = False, None
        if not self.deciding:  # (a decision under way sees the new epoch and drops what it decided)
            self.all_heard.set()
        self.vad.reset()


MAX_UNHEARD_S = 1.0  # audio a session may have waiting for its VAD before its client is read no faster than it is heard


def speculates(args: argparse.Namespace, asr: ASRHandler) -> bool:
    """--speculate, where it can: the tentative answer hears the utterance whole, so not with a streaming ASR, nor
    where the turn itself starts only when the utterance ends (--interrupt_at speech_end)."""
    return args.speculate and not asr.streaming and args.interrupt_at == "speech_start"


# ------------------------------------------------------------------------------------------------
# Handler base and stage plumbing. TRY NOT TO MODIFY: models plug in below, in the handlers.
# ------------------------------------------------------------------------------------------------

class BaseHandler:
    """One model behind one stage: load it in setup(), turn one message into output messages in process()."""

    name = "base"

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """Declare the handler's own flags (in its stage's group of --help); from_args reads them."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BaseHandler:
        """Build the handler from the command line; a forked handler reads its own flags here."""
        return cls()

    def setup(self) -> None:
        """Load the model. Runs once, before the server listens."""

    def warmup(self) -> None:
        """Run the model once so the first user does not pay for lazy initialisation."""

    def describe(self) -> str:
        return self.name

    def process(self, msg: Any) -> Iterator[Any]:
        raise NotImplementedError


class Stage:
    """Worker threads feeding one handler. A session's messages are handled one at a time and in order, each by
    whichever worker is free: a session never waits behind another one's model call while a worker idles.
    Sessions with work waiting take turns, a message each. Stale messages are dropped where they are taken and
    checked again after every output, where the handler's generator is closed (its `finally` frees the model
    call). An exception in one message fails that turn only."""

    def __init__(self, name: str, handler: BaseHandler, workers: int, emit: Callable[[Any], None]):
        self.name, self.handler, self.emit = name, handler, emit
        self.ready: queue.Queue = queue.Queue()  # sessions with a message waiting and no worker on them; None: stop
        self.waiting: dict = {}  # session -> deque of its messages; a session is here while a worker holds it
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def put(self, msg: Any) -> None:
        with self.lock:
            held = msg.session in self.waiting
            self.waiting.setdefault(msg.session, deque()).append(msg)
        if not held:
            self.ready.put(msg.session)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Each worker stops after the work queued before; wait for them `timeout_s` in all. Their sessions are
        closed by then, so their work is dropped as stale, and what a running call makes is thrown away; one
        stuck in a model call does not hold the process (the threads are daemons)."""
        self.close()
        self.join(time.monotonic() + timeout_s)

    def close(self) -> None:
        for _ in self.threads:
            self.ready.put(None)

    def join(self, deadline: float) -> None:
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (session := self.ready.get()) is not None:
            self._serve(session)
            del session  # an idle worker holds no session: a closed one is freed at once

    def _serve(self, session: Session) -> None:
        with self.lock:
            msg = self.waiting[session].popleft()
        self._process(msg)
        with self.lock:
            more = bool(self.waiting[session])
            if not more:
                del self.waiting[session]
        if more:  # to the back of the line: the sessions waiting get a worker first
            self.ready.put(session)

    def _process(self, msg: Any) -> None:
        session = msg.session
        if not session.wants(msg.turn):
            return
        outputs = self.handler.process(msg)
        try:
            for out in outputs:
                if not session.wants(msg.turn):
                    break
                self.emit(out)
        except Exception as exc:  # one failed model call fails its turn, never the stage
            if session.wants(msg.turn):
                logger.exception("%s failed on session %s turn %d", self.name, session.tag, msg.turn)
                session.fail_turn(msg.turn, f"{self.name}_failed", f"{self.name} failed: {exc}")
        finally:
            outputs.close()


# ------------------------------------------------------------------------------------------------
# Remote models: any stage can run behind an OpenAI-compatible HTTP API.
# ------------------------------------------------------------------------------------------------

def api_key(env: str) -> str:
    """The key from `env`, else LLM_API_KEY (one provider often serves every stage), else a placeholder
    that keyless local servers accept."""
    return os.environ.get(env) or os.environ.get("LLM_API_KEY") or "EMPTY"


API_KEEPALIVE_S = 60  # an idle connection to an API is kept this long: the SDK's 5 s end before the user's next turn


def openai_client(base_url: str, key_env: str, timeout_s: float) -> Any:
    openai = require("openai", "pip install openai")
    import httpx2  # the SDK's HTTP library
    # Kept connections spare each request a TCP and a TLS handshake (two round trips to a remote API).
    sdk = openai.DEFAULT_CONNECTION_LIMITS
    limits = httpx2.Limits(max_connections=sdk.max_connections, max_keepalive_connections=sdk.max_keepalive_connections,
                           keepalive_expiry=API_KEEPALIVE_S)
    # A voice turn cannot wait for retries: fail fast and tell the user.
    return openai.OpenAI(base_url=base_url, api_key=api_key(key_env), timeout=timeout_s, max_retries=0,
                         http_client=openai.DefaultHttpxClient(limits=limits))


class APIError(RuntimeError):
    """A remote model failed; the message is one sentence a user can act on."""


@contextlib.contextmanager
def api_errors(what: str, base_url: str, timeout_s: float) -> Iterator[None]:
    import openai
    try:
        yield
    except openai.AuthenticationError as exc:
        raise APIError(f"{what} API at {base_url} refused the API key ({exc.status_code})") from None
    except openai.APIStatusError as exc:
        raise APIError(f"{what} API at {base_url} answered {exc.status_code}: {short_error(exc)}") from None
    except openai.APITimeoutError:
        raise APIError(f"{what} API at {base_url} did not answer within {timeout_s:g} s") from None
    except openai.APIConnectionError:
        raise APIError(f"{what} API at {base_url} cannot be reached") from None


def short_error(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        body = body.get("message", body) if isinstance(body, dict) else body
    return str(body or exc)[:200]


# ------------------------------------------------------------------------------------------------
# ASR: speech -> text.
# ------------------------------------------------------------------------------------------------

class ASRHandler(BaseHandler):
    """Base of every ASR. SWAP MODEL HERE: subclass, implement setup() and transcribe() (or, for a streaming
    model, set `streaming` and implement transcribe_piece())."""

    streaming = False  # True: gets the utterance in pieces while the user speaks, sends partial transcripts
    piece_samples = 9600  # a streaming ASR's piece: 600 ms at 16 kHz

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--asr_language", default="auto", help="language: auto, zh, en, yue, ja or ko (SenseVoice); an ISO code or auto (--asr openai)")
        group.add_argument("--asr_workers", type=int, default=1,
                           help="ASR worker threads, shared by all sessions (each session's utterances in order). More than 1 needs a thread-safe model (remote APIs are)")

    def transcribe(self, audio: np.ndarray) -> str:  # float32 PCM, 16 kHz mono
        raise NotImplementedError

    def transcribe_piece(self, state: dict, audio: np.ndarray, final: bool) -> str:
        """Streaming: feed the next piece of the utterance; return the transcript so far. `state` belongs
        to this utterance (a new dict for each)."""
        raise NotImplementedError

    def process(self, utt: Utterance) -> Iterator[UserText]:
        turn = utt.session.turn_record(utt.turn)
        if self.streaming:
            text = self.transcribe_piece(turn.asr_state, utt.audio, utt.final).strip()
            if not utt.final:
                if text and text != turn.asr_state.get("partial"):
                    turn.asr_state["partial"] = text
                    utt.session.send_event(TranscriptEvent(utt.turn, text, final=False))
                return
        else:
            text = self.transcribe(utt.audio).strip()
        turn.times.transcript, turn.question = now(), text
        utt.session.send_event(TranscriptEvent(utt.turn, text))
        yield UserText(utt.session, utt.turn, text)


@contextlib.contextmanager
def third_party_output() -> Iterator[io.StringIO]:
    """What a library prints while it loads, kept out of the server's output and handed to the caller (at --log_level
    DEBUG it is logged), but for progress bars, which tqdm redraws with a carriage return: a first download shows
    how far it has come."""
    printed = io.StringIO()
    out = ProgressOnly(sys.stderr, printed)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield printed
    finally:
        if printed.getvalue().strip():
            logger.debug("printed by a library while loading:\n%s", printed.getvalue().rstrip())


class ProgressOnly(io.TextIOBase):
    """A stream that keeps everything written to it and passes on only progress bars (text with a carriage return)."""

    def __init__(self, stream: Any, kept: io.StringIO):
        self.stream, self.kept = stream, kept

    def write(self, text: str) -> int:
        self.kept.write(text)
        if "\r" in text:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # a bar draws itself in place on a terminal
        return self.stream.isatty()


def is_local_path(model: str) -> bool:
    """Whether a model flag names a folder (which must exist) rather than a hub id to download."""
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(model)


def download_failure(reason: str) -> str:
    """A download error, as the one cause a user can act on."""
    if re.search(r"No space left|Errno 28", reason):
        return "the disk is full"
    if re.search(r"not a valid model identifier|\b404\b|not exist|NotExist|not found", reason, re.I):
        return "no model has that id"
    if re.search(r"NameResolution|Failed to resolve|Name or service not known|Connection refused|timed out|Network|"
                 r"couldn't connect", reason, re.I):
        return "there is no network (the model hub cannot be reached)"
    return reason[:200]


class FunASRHandler(ASRHandler):
    """FunASR AutoModel: SenseVoiceSmall (multilingual, emotion tags stripped) or Paraformer (Chinese)."""

    name = "funasr"

    def __init__(self, model: str, device: str, language: str, punc_model: str = "", dtype: str = "float32"):
        self.model_name, self.device, self.language = os.path.expanduser(model), device, language
        self.punc_model, self.dtype = punc_model, dtype

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--asr_model_name", "--stt_model_name", default="iic/SenseVoiceSmall",
                           help="FunASR model id or local directory: SenseVoiceSmall (iic/SenseVoiceSmall), Paraformer (paraformer-zh), or with --asr funasr_streaming paraformer-zh-streaming")
        group.add_argument("--asr_punc_model", default="", help="FunASR punctuation model for Paraformer, e.g. ct-punc (SenseVoice punctuates by itself)")
        group.add_argument("--asr_dtype", "--stt_dtype", choices=["float32", "float16"], default="float32", help="FunASR precision; float16 applies to Paraformer on CUDA")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FunASRHandler:
        return cls(args.asr_model_name, resolve_device(args.device), args.asr_language, args.asr_punc_model, args.asr_dtype)

    def describe(self) -> str:
        return f"funasr {self.model_name} ({type(self.model.model).__name__}) on {self.device}, {self.dtype}"

    def setup(self) -> None:
        local = is_local_path(self.model_name)
        if local and not os.path.isdir(self.model_name):
            raise SystemExit(f"ASR model {self.model_name} does not exist: give --asr_model_name an existing FunASR model "
                             f"folder, or a model id such as iic/SenseVoiceSmall to download")
        if local and not os.path.isfile(os.path.join(self.model_name, "config.yaml")):
            raise SystemExit(f"--asr_model_name {self.model_name}: no FunASR model there (a model directory holds config.yaml)")
        level = logging.getLogger().level
        with third_party_output():  # importing funasr prints notices and every optional import of its that failed
            AutoModel = require("funasr", "pip install funasr kaldi-native-fbank").AutoModel
            from funasr.utils.postprocess_utils import rich_transcription_postprocess
        logging.getLogger().setLevel(level)  # importing funasr resets the root logger's level
        self.postprocess = rich_transcription_postprocess
        punc = {"punc_model": self.punc_model} if self.punc_model else {}
        with third_party_output() as printed:  # and the model's download, if it is not here yet
            try:
                self.model = AutoModel(model=self.model_name, device=self.device, disable_update=True, disable_pbar=True,
                                       log_level="ERROR", **punc)
            except Exception as exc:
                failed = re.search(r"Download: \S+ failed!: (.*)", printed.getvalue())
                if local or failed is None:
                    raise
                raise SystemExit(f"ASR model {self.model_name} could not be downloaded from ModelScope: "
                                 f"{download_failure(failed.group(1))}. Download it where there is a network "
                                 f"(modelscope download --model {self.model_name} --local_dir DIR) and start with "
                                 f"--asr_model_name DIR, or transcribe through an API with --asr openai") from exc
        kind = type(self.model.model).__name__
        self.is_sensevoice = "sensevoice" in kind.lower()
        if self.dtype == "float16":
            # FunASR casts the input to half precision for Paraformer only, and half precision needs a GPU.
            if "paraformer" in kind.lower() and self.device.startswith("cuda"):
                self.model.model.half()
                self.model.kwargs["fp16"] = True
            else:
                logger.warning("--asr_dtype float16 needs a Paraformer model on CUDA; %s on %s runs in float32", kind, self.device)
                self.dtype = "float32"

    def warmup(self) -> None:
        self.transcribe(np.zeros(SAMPLE_RATE, np.float32))

    def transcribe(self, audio: np.ndarray) -> str:
        kwargs = {"language": self.language, "use_itn": True} if self.is_sensevoice else {}
        result = self.model.generate(input=audio, cache={}, disable_pbar=True, **kwargs)
        text = "".join(r.get("text", "") for r in result)
        return self.postprocess(text) if self.is_sensevoice else text


class FunASRStreamingHandler(FunASRHandler):
    """FunASR streaming Paraformer (paraformer-zh-streaming): live partial transcripts while the user speaks."""

    name = "funasr_streaming"
    streaming = True
    STREAM_ARGS = dict(chunk_size=[0, 10, 5], encoder_chunk_look_back=4, decoder_chunk_look_back=1)  # 600 ms pieces

    def warmup(self) -> None:
        self.transcribe_piece({}, np.zeros(2 * self.piece_samples, np.float32), final=True)

    def transcribe_piece(self, state: dict, audio: np.ndarray, final: bool) -> str:
        buf = np.concatenate([state.get("buffer", np.zeros(0, np.float32)), audio])
        cache = state.setdefault("cache", {})
        text = state.get("text", "")
        while len(buf) >= self.piece_samples or (final and "done" not in state):
            piece, buf = buf[:self.piece_samples], buf[self.piece_samples:]
            is_final = final and not len(buf)
            result = self.model.generate(input=piece, cache=cache, is_final=is_final, disable_pbar=True, **self.STREAM_ARGS)
            text += "".join(r.get("text", "") for r in result)
            if is_final:
                state["done"] = True
        state["buffer"], state["text"] = buf, text
        return text


class OpenAIASRHandler(ASRHandler):
    """Any OpenAI-compatible /v1/audio/transcriptions endpoint (Whisper servers, vLLM, OpenAI, ...).
    Key from ASR_API_KEY (else LLM_API_KEY)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, language: str, timeout_s: float):
        self.base_url, self.model, self.language, self.timeout_s = base_url, model, language, timeout_s

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--asr_api_url", default="https://api.openai.com/v1", help="--asr openai: base URL of the transcription API")
        group.add_argument("--asr_api_model", default="whisper-1", help="--asr openai: model name (key from ASR_API_KEY, else LLM_API_KEY)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OpenAIASRHandler:
        return cls(args.asr_api_url, args.asr_api_model, args.asr_language, args.speech_api_timeout_s)

    def describe(self) -> str:
        return f"openai-compatible transcription {self.model} at {self.base_url}"

    def setup(self) -> None:
        self.client = openai_client(self.base_url, "ASR_API_KEY", self.timeout_s)

    def transcribe(self, audio: np.ndarray) -> str:
        language = {} if self.language == "auto" else {"language": self.language}
        with api_errors("ASR", self.base_url, self.timeout_s):
            result = self.client.audio.transcriptions.create(
                model=self.model, file=("speech.wav", wav_bytes(to_pcm16(audio)), "audio/wav"), **language)
        return result.text


ASR_HANDLERS: dict = {"funasr": FunASRHandler, "funasr_streaming": FunASRStreamingHandler, "openai": OpenAIASRHandler}


# ------------------------------------------------------------------------------------------------
# LLM: text -> a stream of speakable chunks.
# ------------------------------------------------------------------------------------------------

CJK_CHARS = "\u3400-\u9fff\uf900-\ufaff"  # a character class: CJK ideographs (unified, extension A, compatibility)
CJK = re.compile(f"[{CJK_CHARS}]")
WIDE = re.compile(f"[{CJK_CHARS}\u3000-\u303f\uff00-\uffef]")  # and CJK punctuation, full-width forms: no spaces between
# Where speech may pause. CJK marks end a chunk at once; ASCII marks only when followed by a space,
# so "3.14" and "e.g." inside a sentence do not split it.
HARD_BREAK = re.compile(r"[。！？；…\n]+|[.!?;]+(?=\s)")
SOFT_BREAK = re.compile(r"[，、：,:]+(?=\s)|[，、：]+")
SPEAKABLE = re.compile(rf"[\w{CJK_CHARS}]")
MAX_CHUNK_CHARS = 120  # a longer chunk is cut at its last comma, so TTS never waits for a paragraph


def joined(first: str, then: str) -> str:
    """Two transcripts of one speaker as one text: a space between them, none between Chinese characters or marks."""
    close = WIDE.match(first[-1:]) and WIDE.match(then[:1])
    return f"{first}{'' if close else ' '}{then}" if first and then else first or then


def speech_length(text: str) -> int:
    """Characters, a Chinese character counting as two: it is a syllable, a Latin letter a fraction of one."""
    text = text.strip()
    return len(text) + len(CJK.findall(text))


class SpeakableChunker:
    """Cuts a token stream into chunks a TTS can say: at sentence ends, and for the first chunk already at a
    comma once it has `first_min_chars` (None: sentences only), so the first audio starts early. Chinese and
    English punctuation."""

    def __init__(self, first_min_chars: Optional[int] = 6):
        self.first_min_chars = first_min_chars
        self.buffer = ""
        self.emitted = 0

    def push(self, delta: str) -> list:
        self.buffer += delta
        chunks = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return chunks
            chunk, self.buffer = self.buffer[:cut], self.buffer[cut:]
            if SPEAKABLE.search(chunk):
                chunks.append(chunk)
                self.emitted += 1
            elif chunks:  # punctuation only: keep it with the chunk before
                chunks[-1] += chunk
            else:
                self.buffer = chunk + self.buffer
                return chunks

    def flush(self) -> str:
        rest, self.buffer = self.buffer, ""
        return rest

    def _find_cut(self) -> Optional[int]:
        for m in HARD_BREAK.finditer(self.buffer):
            if SPEAKABLE.search(self.buffer[:m.start()]):
                return m.end()
        early_first = self.emitted == 0 and self.first_min_chars is not None
        if early_first or len(self.buffer) > MAX_CHUNK_CHARS:
            cuts = [m.end() for m in SOFT_BREAK.finditer(self.buffer)
                    if speech_length(self.buffer[:m.start()]) >= (self.first_min_chars or 0)]
            if cuts:
                return cuts[0] if self.emitted == 0 else cuts[-1]
        return None


_DONE = object()


def until_cancelled(source: Iterator[Any], cancelled: concurrent.futures.Future) -> Iterator[Any]:
    """Yield what `source` yields, reading it on a thread of its own, and return as soon as `cancelled` is done.
    A model call cannot be interrupted while it waits (for an API's first token, or through a long prompt):
    read on the stage's worker, a stale turn would hold that worker, and with it the user's next question,
    until then. The source is closed on its own thread after its next item (which closes the HTTP stream or
    stops generate())."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    abandoned = threading.Event()

    def pump() -> None:
        try:
            for item in source:
                if abandoned.is_set():
                    break
                items.put((item, None))
        except Exception as exc:
            items.put((None, exc))
        finally:
            source.close()
            items.put(_DONE)

    cancelled.add_done_callback(lambda _: items.put(_DONE))
    threading.Thread(target=pump, name="llm-read", daemon=True).start()
    try:
        while (got := items.get()) is not _DONE:
            item, exc = got
            if exc is not None:
                raise exc
            yield item
    finally:
        abandoned.set()


class LLMHandler(BaseHandler):
    """Base of every LLM. SWAP MODEL HERE: subclass, implement stream() (and setup() if it loads weights)."""

    takes_tools = False  # True: it has deltas(messages, tools=..., tool_choice=...), as OpenAILLMHandler

    def __init__(self, system_role: str = "system", system_prompt: str = "", first_chunk_min_chars: Optional[int] = 6):
        self.system_role, self.system_prompt = system_role, system_prompt
        self.first_chunk_min_chars = first_chunk_min_chars
        self.text_stream = False  # set when the TTS reads text as it is written (--tts_text_stream)

    @staticmethod
    def common_args(args: argparse.Namespace) -> dict:
        return dict(system_role=args.init_chat_role, system_prompt=args.init_chat_prompt,
                    first_chunk_min_chars=args.first_chunk_min_chars if args.first_chunk == "clause" else None)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--lm_model_name", default=None,
                           help=f"--llm openai: model name at the API (default gpt-4o-mini); --llm transformers: hub id or local directory (default {DEFAULT_LOCAL_LLM})")
        group.add_argument("--lm_temperature", type=float, default=0.7, help="sampling temperature")
        group.add_argument("--lm_max_new_tokens", "--max_new_tokens", type=int, default=160, help="most tokens in one answer")
        group.add_argument("--init_chat_role", default="system", help="role of the prompt that opens every conversation")
        group.add_argument("--init_chat_prompt", default=DEFAULT_SYSTEM_PROMPT, help="prompt that opens every conversation")
        group.add_argument("--first_chunk_min_chars", type=int, default=6,
                           help="the first speakable chunk may end at a comma once it has this many characters (a Chinese character counts as two), so the first audio starts early")
        group.add_argument("--first_chunk", choices=["clause", "sentence"], default="clause",
                           help="where the first chunk sent to the TTS may end: clause (see --first_chunk_min_chars) or sentence (as CleanS2S did)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LLMHandler:
        return cls(**cls.common_args(args))

    def stream(self, messages: list) -> Iterator[str]:
        """Yield the answer's text as it is generated. Closing the generator must stop generation."""
        raise NotImplementedError

    def respond(self, msg: UserText, turn: Turn, messages: list) -> Iterator[str]:
        """The answer to one question, as text pieces. A fork that does more than call the model (look things up,
        call tools) overrides this; s2s_server_pipeline_rag.py does."""
        return self.stream(messages)

    def process(self, msg: UserText) -> Iterator[AnswerText]:
        session, turn = msg.session, msg.session.turn_record(msg.turn)
        if not msg.text and turn.spoken:  # nothing was said: end the turn quietly
            yield AnswerText(session, msg.turn, 0, "", last=True)
            return
        messages = session.prompt(turn, self.system_role, self.system_prompt, msg.text)
        turn.llm_requests += 1
        chunker, seq = SpeakableChunker(self.first_chunk_min_chars), 0
        feed = TextFeed() if self.text_stream and session.speaks(msg.turn) else None
        tokens = until_cancelled(self.respond(msg, turn, messages), turn.cancelled)
        try:
            for delta in tokens:
                if turn.times.llm_first_token is None:
                    turn.times.llm_first_token = now()
                    if feed is not None:  # the TTS starts at the first token and reads on as text arrives
                        turn.times.llm_first_chunk = turn.times.llm_first_token
                        yield AnswerText(session, msg.turn, 0, "", last=True, feed=feed)
                if feed is not None:
                    if not session.wants(msg.turn):
                        break
                    feed.put(delta)
                    continue
                for chunk in chunker.push(delta):
                    turn.times.llm_first_chunk = turn.times.llm_first_chunk or now()
                    yield AnswerText(session, msg.turn, seq, chunk, last=False)
                    seq += 1
        except Exception as exc:  # the user hears what was generated, then an error
            if not session.wants(msg.turn):
                return
            logger.warning("LLM failed on session %s turn %d: %s", session.tag, msg.turn, exc)
            session.send_event(ErrorEvent("llm_failed", f"LLM failed: {exc}", msg.turn))
        else:
            if turn.times.llm_first_token is None and session.wants(msg.turn):  # e.g. a reply in the wrong format
                logger.warning("LLM sent no text on session %s turn %d", session.tag, msg.turn)
                session.send_event(ErrorEvent("llm_failed", "LLM failed: it sent no text (an empty or malformed reply)", msg.turn))
        finally:
            tokens.close()
            if feed is not None:
                feed.close()
        if feed is None or turn.times.llm_first_token is None:
            rest = chunker.flush()
            if rest.strip():
                turn.times.llm_first_chunk = turn.times.llm_first_chunk or now()
            yield AnswerText(session, msg.turn, seq, rest, last=True)


class OpenAILLMHandler(LLMHandler):
    """Any OpenAI-compatible chat API (OpenAI, DeepSeek, vLLM, Ollama, ...), streamed. Key from LLM_API_KEY."""

    name = "openai"
    takes_tools = True  # deltas() passes tools= and tool_choice= on to the API (the RAG agent's look-ups)

    def __init__(self, base_url: str, model: str, temperature: float, max_tokens: int, timeout_s: float, **kwargs):
        super().__init__(**kwargs)
        self.base_url, self.model = base_url, model
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s
        self.counts_tokens = True  # stream_options is asked for, until a server refuses it

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--lm_model_url", default=None, help="--llm openai: base URL of the API (default https://api.openai.com/v1)")
        group.add_argument("--lm_timeout_s", type=float, default=30.0, help="--llm openai: seconds to wait for the API to connect or send the next token")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OpenAILLMHandler:
        return cls(args.lm_model_url, args.lm_model_name, args.lm_temperature, args.lm_max_new_tokens,
                   args.lm_timeout_s, **cls.common_args(args))

    def describe(self) -> str:
        return f"openai-compatible {self.model} at {self.base_url}"

    def setup(self) -> None:
        self.client = openai_client(self.base_url, "LLM_API_KEY", self.timeout_s)

    def warmup(self) -> None:
        """One token, once: a wrong URL, key or model stops start-up instead of failing the first user, and the
        client library's first-request cost (~20 ms) is paid here."""
        with api_errors("LLM", self.base_url, self.timeout_s):
            self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)

    def stream(self, messages: list) -> Iterator[str]:
        for delta in self.deltas(messages):
            if delta.get("content"):
                yield delta["content"]

    def respond(self, msg: UserText, turn: Turn, messages: list) -> Iterator[str]:
        """The answer's text, its token counts in turn.usage; where the session offers functions (an OpenAI Realtime
        client's tools), the model may call them: each call goes to the client, piece by piece, as ToolCallEvents."""
        tools = {"tools": msg.session.tools, "tool_choice": msg.session.tool_choice} if msg.session.tools else {}
        calls: dict = {}  # index -> the call's id and name
        for delta in self.deltas(messages, usage=turn.usage, **tools):
            if delta.get("content"):
                yield delta["content"]
            for index, call_id, name, piece in tool_call_pieces(delta):
                turn.times.llm_first_token = turn.times.llm_first_token or now()  # a call is the model's answer too
                known = calls.setdefault(index, {"id": call_id or f"call_{secrets.token_hex(12)}", "name": "", "args": ""})
                known["name"] += name
                known["args"] += piece
                msg.session.send_event(ToolCallEvent(msg.turn, index, known["id"], known["name"], piece))
        for index, known in calls.items():
            msg.session.send_event(ToolCallEvent(msg.turn, index, known["id"], known["name"], known["args"], done=True))

    def deltas(self, messages: list, usage: Optional[dict] = None, **request: Any) -> Iterator[dict]:
        """The streamed reply's deltas as the API sends them: dicts with "content", and "tool_calls" when `request`
        offers tools (as the RAG agent does). With `usage`, the reply's token counts go into it (input_tokens,
        output_tokens) where the API reports them."""
        import httpx2  # the openai SDK's HTTP library
        with api_errors("LLM", self.base_url, self.timeout_s):
            response = self.create(messages, usage is not None, request)
            try:
                for chunk in self.chunks(response):
                    delta = first_delta(chunk)
                    if delta:
                        yield delta
                    counts = chunk.get("usage") if isinstance(chunk, dict) else None
                    if usage is not None and isinstance(counts, dict):
                        usage.update(input_tokens=counts.get("prompt_tokens"), output_tokens=counts.get("completion_tokens"))
            except httpx2.TimeoutException:
                raise APIError(f"LLM API at {self.base_url} sent nothing for {self.timeout_s:g} s") from None
            except httpx2.TransportError as exc:
                raise APIError(f"LLM API at {self.base_url} broke off its answer ({type(exc).__name__})") from None
            finally:
                response.close()  # mid-answer (a barge-in): closes the HTTP stream, the server stops generating

    def chunks(self, response: Any) -> Iterator[Any]:
        """The JSON chunks of a streamed reply, read to the end of its body, which follows [DONE] at once: the
        connection then serves the next request. (The SDK's own reader closes it at [DONE], and every turn paid for
        a new one: a TCP and a TLS handshake, two round trips to the API, before its first token.)"""
        for data in sse_data(response.iter_lines()):
            if data == "[DONE]":
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                raise APIError(f"LLM API at {self.base_url} sent a chunk that is not JSON: {data[:80]}") from None
            if isinstance(chunk, dict) and chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise APIError(f"LLM API at {self.base_url} failed mid-answer: {str(message)[:160]}")
            yield chunk

    def create(self, messages: list, counted: bool, request: dict) -> Any:
        """The streamed request, its HTTP response still to be read; `counted` asks for the token counts
        (stream_options), unless the server refused them. It goes out as the chat API's JSON and its chunks are read
        as plain dicts: the SDK's typed request and reply objects cost ~8 ms of CPU a call with a full history (2
        cores), plain ones ~2 ms, and that is the turn's time too."""
        import httpx2
        import openai
        ask = dict(model=self.model, messages=messages, stream=True, temperature=self.temperature,
                   max_tokens=self.max_tokens, **request)
        post = functools.partial(self.client.post, "/chat/completions", cast_to=httpx2.Response, stream=True)
        if counted and self.counts_tokens:
            try:
                return post(body={**ask, "stream_options": {"include_usage": True}})
            except openai.BadRequestError as exc:
                if "stream_options" not in str(exc):
                    raise
                self.counts_tokens = False  # an older OpenAI-compatible server: answers count no tokens
                logger.warning("the chat API refuses stream_options (%s): token counts are not reported", short_error(exc))
        return post(body=ask)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event, in order (its data lines joined); comments and other fields are skipped."""
    data: list = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


def tool_call_pieces(delta: dict) -> Iterator[tuple]:
    """(index, id, name, arguments) of each piece of a function call in a streamed delta: a call comes in several,
    its id and name in the first, its arguments spread over all ("" where a piece has none)."""
    for call in delta.get("tool_calls") or []:
        function = call.get("function") or {}
        yield call.get("index", 0), call.get("id") or "", function.get("name") or "", function.get("arguments") or ""


def first_delta(chunk: Any) -> dict:
    """The first choice's delta of a streamed chat chunk, as the API sent it; {} where the chunk has none (the token
    counts at the end) or is not the shape the API documents."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    delta = choices[0].get("delta") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    return delta if isinstance(delta, dict) else {}


class EchoLLMHandler(LLMHandler):
    """Answers with what it heard: checks microphone, VAD, ASR and TTS without any API key."""

    name = "echo"

    def stream(self, messages: list) -> Iterator[str]:
        heard = messages[-1]["content"]
        yield "你说的是：" if CJK.search(heard) else "You said: "
        for word in re.findall(r"\S+\s*", heard):
            yield word


@dataclass(eq=False)  # entries are told apart by identity
class CachedPrefix:
    ids: np.ndarray  # int64 token ids whose keys and values `cache` holds
    prompt_len: int  # how many of them were the prompt; the rest were generated
    cache: Any  # a transformers DynamicCache


class PrefixCache:
    """The attention caches (keys and values) of recent conversations. Every turn re-sends the whole history,
    so without them a local LLM's first token comes later with every turn. With them a turn computes only the
    tokens its prompt does not share with an earlier prompt and answer: usually just the new question. A
    prompt that continues a conversation takes that conversation's cache over; one that only shares a prefix
    with it (the system prompt of a new session) gets a copy, so a stored cache is never changed under
    another conversation."""

    def __init__(self, size: int):
        self.size = size
        self.entries: list = []  # CachedPrefix, least recently used first
        self.lock = threading.Lock()

    def take(self, ids: np.ndarray) -> Optional[Any]:
        """A cache holding the longest stored prefix of `ids`, less at least the last token (the model must
        compute one token to predict the next), or None."""
        with self.lock:
            best, shared = None, 0
            for e in self.entries:
                n = common_prefix_len(e.ids, ids)
                if n > shared:
                    best, shared = e, n
            if best is None:
                return None
            continues = shared >= best.prompt_len  # the same conversation, a turn later
            if continues:
                self.entries.remove(best)
        cache = best.cache if continues else copy.deepcopy(best.cache)
        cache.crop(min(shared, len(ids) - 1) - cache.get_seq_length())  # a negative count of tokens to drop
        return cache

    def put(self, ids: np.ndarray, prompt_len: int, cache: Any) -> None:
        with self.lock:
            self.entries.append(CachedPrefix(ids, prompt_len, cache))
            del self.entries[:-self.size]


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class TransformersLLMHandler(LLMHandler):
    """A local chat model with transformers (a hub id or a local directory), streamed token by token. A
    barge-in stops generation at the next token: a stopping criterion checks a flag at every step. Each turn
    starts from the attention cache of the conversation so far (PrefixCache)."""

    name = "transformers"

    def __init__(self, model: str, device: str, dtype: str, temperature: float, max_tokens: int, compile: bool,
                 prefix_cache: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.model_name, self.device, self.dtype = model, device, dtype
        self.temperature, self.max_tokens, self.compile = temperature, max_tokens, compile
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache > 0 else None

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--lm_dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16", help="--llm transformers: precision")
        group.add_argument("--lm_compile", action="store_true", help="--llm transformers: torch.compile the model (slower start, faster tokens on GPU)")
        group.add_argument("--lm_prefix_cache", type=int, default=None,
                           help="--llm transformers: keep the attention cache of this many recent conversations, so a turn computes only "
                                "the tokens its prompt does not share with an earlier one (0: off; default: --max_sessions)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransformersLLMHandler:
        return cls(args.lm_model_name, resolve_device(args.device), args.lm_dtype, args.lm_temperature,
                   args.lm_max_new_tokens, args.lm_compile,
                   args.max_sessions if args.lm_prefix_cache is None else args.lm_prefix_cache, **cls.common_args(args))

    def describe(self) -> str:
        cache = f", prefix cache of {self.prefixes.size}" if self.prefixes else ""
        return f"transformers {self.model_name} on {self.device}, {self.dtype}{', compiled' if self.compile else ''}{cache}"

    def setup(self) -> None:
        transformers = require("transformers", "pip install transformers")
        torch = require("torch", "pip install torch")
        self.transformers, self.torch = transformers, torch
        if logging.getLogger().level > logging.DEBUG:  # a warning for every retry of a failed download, on its own handler too
            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        # transformers 4 (CosyVoice's requirements install 4.51) calls the precision torch_dtype, and its attention
        # cache has another API: the prefix cache needs 5.
        major = major_version(transformers)
        precision = {"dtype" if major >= 5 else "torch_dtype": getattr(torch, self.dtype)}
        if self.prefixes and major < 5:
            logger.info("LLM prefix cache off: it needs transformers 5 or later (this is %s)", transformers.__version__)
            self.prefixes = None
        local = is_local_path(self.model_name)
        if local and not os.path.isdir(self.model_name):
            raise SystemExit(f"LLM model {self.model_name} does not exist: give --lm_model_name an existing model folder, "
                             f"or a Hugging Face model id such as {DEFAULT_LOCAL_LLM} to download")
        if not local and not self.cached():
            logger.info("LLM %s is not downloaded yet: downloading it from the Hugging Face Hub (once)", self.model_name)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_name)
        except OSError as exc:
            if local:
                raise
            cause = download_failure(f"{exc} {exc.__cause__ or ''}")
            raise SystemExit(f"LLM model {self.model_name} could not be downloaded from the Hugging Face Hub: {cause}. "
                             f"Download it where there is a network (hf download {self.model_name} --local-dir DIR) and "
                             f"start with --lm_model_name DIR, or use a chat API with --llm openai") from exc
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_name, **precision).to(self.device).eval()
        if self.compile:
            self.model.forward = torch.compile(self.model.forward)

    def cached(self) -> bool:
        """Is the hub model already in the local Hugging Face cache? (Asks no server.)"""
        from huggingface_hub import try_to_load_from_cache
        try:
            return isinstance(try_to_load_from_cache(self.model_name, "config.json"), str)
        except ValueError:  # not a valid hub id: from_pretrained says why
            return True

    def warmup(self) -> None:
        for _ in range(2):  # the second time through the prefix cache
            for _ in self.stream([{"role": "user", "content": "Hello"}]):
                pass

    def stream(self, messages: list) -> Iterator[str]:
        tf, torch = self.transformers, self.torch
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.device)
        streamer = tf.TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, failure, result = threading.Event(), [], []
        ids, prefixes = inputs["input_ids"][0].cpu().numpy(), self.prefixes
        cache = prefixes.take(ids) if prefixes else None
        if prefixes and cache is None:
            cache = tf.DynamicCache(config=self.model.config)  # generate() fills it in place

        class StopWhenAsked(tf.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # -> BoolTensor (batch,): stop each sequence?
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}

        def generate() -> None:
            try:
                result.append(self.model.generate(
                    **inputs, past_key_values=cache, streamer=streamer, max_new_tokens=self.max_tokens,
                    stopping_criteria=tf.StoppingCriteriaList([StopWhenAsked()]),
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling))
            except Exception as exc:
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="llm-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
            if failure:
                raise failure[0]
        finally:
            stop.set()  # a closed stream (barge-in) stops generation at the next token
            thread.join()
            if result and prefixes:
                self._keep(prefixes, result[0][0], len(ids), cache)

    def _keep(self, prefixes: PrefixCache, sequence: Any, prompt_len: int, cache: Any) -> None:
        """Store the cache of a finished (or stopped) generation for the conversation's next turn."""
        if any(type(layer) is not self.transformers.DynamicLayer for layer in cache.layers):
            # A sliding-window or linear-attention layer cannot be cut back to an earlier prefix.
            logger.info("LLM prefix cache off: %s keeps %s layers", self.model_name,
                        {type(layer).__name__ for layer in cache.layers})
            self.prefixes = None
            return
        prefixes.put(sequence[:cache.get_seq_length()].cpu().numpy(), prompt_len, cache)


LLM_HANDLERS: dict = {"echo": EchoLLMHandler, "openai": OpenAILLMHandler, "transformers": TransformersLLMHandler}


# ------------------------------------------------------------------------------------------------
# TTS: text chunks -> 16 kHz int16 audio.
# ------------------------------------------------------------------------------------------------

MARKUP = re.compile(r"[*#_`~>|]+|\[(?:[^\]]*)\]\((?:[^)]*)\)|https?://\S+")


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling (soxr) of a whole float32 mono signal."""
    if rate_in == rate_out:
        return audio
    import soxr
    return soxr.resample(audio, rate_in, rate_out)


def resample_stream(pieces: Iterator[np.ndarray], rate_in: Callable[[], int]) -> Iterator[np.ndarray]:
    """A stream of float32 mono pieces resampled to 16 kHz through one soxr stream, so piece borders make no
    clicks. `rate_in()` is asked at the first non-empty piece: a WAV stream's rate is known once its header
    has arrived."""
    import soxr
    resampler = None
    for audio in pieces:
        if not len(audio):
            continue
        if resampler is None:
            resampler = soxr.ResampleStream(rate_in(), SAMPLE_RATE, 1, dtype="float32")
        yield resampler.resample_chunk(audio)
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


class TTSHandler(BaseHandler):
    """Base of every TTS. SWAP MODEL HERE: subclass, implement synthesize() (and choose_voice() for a TTS with
    several voices; a session keeps the voice it was given)."""

    reads_text_stream = False  # True: synthesize() also takes a generator of text pieces (--tts_text_stream)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--tts_workers", type=int, default=2, help="TTS worker threads, shared by all sessions (each session's sentences in order); "
                           "more let more sessions speak at once, if the model takes concurrent calls")

    def choose_voice(self) -> Any:
        return None

    def voice_named(self, name: str) -> Any:
        """The voice a client asks for by name (an OpenAI Realtime client's `voice`); None where there is none of that
        name. voice_names() lists them; an empty list: the TTS has no voices to choose from."""
        return None

    def voice_names(self) -> list:
        return []

    def synthesize(self, text: Any, voice: Any = None) -> Iterator[np.ndarray]:
        """Yield float32 16 kHz mono audio for `text`, in pieces as they are ready. Closing the generator stops."""
        raise NotImplementedError

    def process(self, chunk: AnswerText) -> Iterator[AnswerAudio]:
        session, turn = chunk.session, chunk.session.turn_record(chunk.turn)
        if session.voice is None:
            session.voice = self.choose_voice()
        if chunk.feed is not None:  # the LLM's text as it is written, read by the TTS as it speaks
            for audio in self.synthesize(clean_stream(chunk.feed.pieces()), session.voice):
                if turn.times.tts_first_audio is None:
                    turn.times.tts_first_audio = now()
                yield AnswerAudio(session, chunk.turn, chunk.seq, chunk.feed.take_read(), to_pcm16(audio), last=False)
            yield AnswerAudio(session, chunk.turn, chunk.seq, chunk.feed.take_read(), b"", last=True)
            return
        spoken = MARKUP.sub(" ", chunk.text).strip()
        text = chunk.text
        if SPEAKABLE.search(spoken):
            for audio in self.synthesize(spoken, session.voice):
                if turn.times.tts_first_audio is None:
                    turn.times.tts_first_audio = now()
                yield AnswerAudio(session, chunk.turn, chunk.seq, text, to_pcm16(audio), last=False)
                text = ""
        # The chunk's end (with its text, if it made no sound): a legacy client gets a chunk in one message.
        yield AnswerAudio(session, chunk.turn, chunk.seq, text, b"", last=chunk.last)


def clean_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Markup removed from streamed text (a generator, as CosyVoice requires)."""
    for text in pieces:
        spoken = MARKUP.sub(" ", text)
        if spoken:
            yield spoken


class EspeakTTSHandler(TTSHandler):
    """espeak-ng: robotic but real, needs no GPU and no download; English and Mandarin voices."""

    name = "espeak"

    def __init__(self, voice_en: str, voice_zh: str, speed: int):
        self.voice_en, self.voice_zh, self.speed = voice_en, voice_zh, speed

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--tts_voice_en", default="en-us", help="espeak-ng voice for text without Chinese characters")
        group.add_argument("--tts_voice_zh", default="cmn", help="espeak-ng voice for text with Chinese characters")
        group.add_argument("--tts_speed", type=int, default=175, help="espeak-ng speaking rate in words per minute")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EspeakTTSHandler:
        return cls(args.tts_voice_en, args.tts_voice_zh, args.tts_speed)

    def describe(self) -> str:
        return f"espeak-ng voices {self.voice_en}/{self.voice_zh}"

    def setup(self) -> None:
        try:
            subprocess.run(["espeak-ng", "--version"], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng (or brew install espeak-ng)") from exc

    def warmup(self) -> None:
        for _ in self.synthesize("ok"):
            pass

    def synthesize(self, text: str, voice: Any = None) -> Iterator[np.ndarray]:
        voice = self.voice_zh if CJK.search(text) else self.voice_en
        # Text goes in on stdin, so a chunk that starts with "-" is never read as an option.
        wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(self.speed), "--stdout"],
                             input=text.encode(), capture_output=True, check=True, timeout=30).stdout
        rate, audio = read_wav_bytes(wav)
        yield resample(audio, rate)


def find_wav_data(data: bytes) -> Optional[tuple]:
    """(sample_rate, channels, offset of the PCM) of a 16-bit PCM WAV header, None until all of it is here.
    The data size may be unset, as in a WAV written to a pipe."""
    if len(data) >= 12 and (data[:4] != b"RIFF" or data[8:12] != b"WAVE"):
        raise ValueError("not a WAV stream")
    pos, rate, channels = 12, None, 1
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            if len(data) < pos + 24:
                return None
            channels, rate, _, _, bits = struct.unpack("<HIIHH", data[pos + 10:pos + 24])
            if bits != 16:
                raise ValueError(f"WAV of {bits}-bit samples; 16-bit PCM expected")
        elif cid == b"data":
            return (rate, channels, pos + 8) if rate else None
        pos += 8 + size
    return None


def read_wav_bytes(data: bytes) -> tuple:
    """(sample_rate, float32 mono) of a whole 16-bit PCM WAV."""
    decoder = WavStreamDecoder()
    audio = decoder.feed(data)
    if decoder.rate is None:
        raise ValueError("WAV stream without data")
    return decoder.rate, audio


class WavStreamDecoder:
    """Turns the bytes of a 16-bit PCM WAV, as they arrive, into float32 mono audio."""

    def __init__(self):
        self.header = b""
        self.rate: Optional[int] = None
        self.channels = 1
        self.rest = b""  # an odd byte / partial frame waiting for its other half

    def feed(self, data: bytes) -> np.ndarray:
        if self.rate is None:
            self.header += data
            found = find_wav_data(self.header)
            if found is None:
                return np.zeros(0, np.float32)
            self.rate, self.channels, start = found
            data, self.header = self.header[start:], b""
        data = self.rest + data
        frame = 2 * self.channels
        usable = len(data) // frame * frame
        self.rest = data[usable:]
        pcm = np.frombuffer(data[:usable], "<i2").reshape(-1, self.channels).mean(axis=1)
        return (pcm / 32768.0).astype(np.float32)


class OpenAITTSHandler(TTSHandler):
    """Any OpenAI-compatible /v1/audio/speech endpoint, streamed as it is synthesized.
    Key from TTS_API_KEY (else LLM_API_KEY)."""

    name = "openai"
    PCM_RATE = 24000  # Hz: OpenAI's documented rate of response_format=pcm

    def __init__(self, base_url: str, model: str, voice: str, response_format: str, timeout_s: float):
        self.base_url, self.model, self.voice = base_url, model, voice
        self.response_format, self.timeout_s = response_format, timeout_s

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--tts_api_url", default="https://api.openai.com/v1", help="--tts openai: base URL of the speech API")
        group.add_argument("--tts_api_model", default="tts-1", help="--tts openai: model name (key from TTS_API_KEY, else LLM_API_KEY)")
        group.add_argument("--tts_api_voice", default="alloy", help="--tts openai: voice name")
        group.add_argument("--tts_api_format", choices=["wav", "pcm"], default="wav", help="--tts openai: audio format asked for (pcm: 24 kHz int16, as OpenAI sends it)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OpenAITTSHandler:
        return cls(args.tts_api_url, args.tts_api_model, args.tts_api_voice, args.tts_api_format, args.speech_api_timeout_s)

    def describe(self) -> str:
        return f"openai-compatible speech {self.model}/{self.voice} at {self.base_url}"

    def voice_named(self, name: str) -> str:
        return name  # the API knows its voices

    def setup(self) -> None:
        self.client = openai_client(self.base_url, "TTS_API_KEY", self.timeout_s)

    def synthesize(self, text: str, voice: Any = None) -> Iterator[np.ndarray]:
        with api_errors("TTS", self.base_url, self.timeout_s):
            with self.client.audio.speech.with_streaming_response.create(
                    model=self.model, voice=voice or self.voice, input=text, response_format=self.response_format) as response:
                ctype = response.headers.get("content-type", "")
                if not ctype.startswith(("audio/", "application/octet-stream")):
                    raise APIError(f"TTS API at {self.base_url} answered {ctype or 'no content type'}, not audio: "
                                   f"{response.read()[:200]!r}")
                decoder = WavStreamDecoder()
                if self.response_format == "pcm":
                    decoder.rate = self.PCM_RATE
                sent = False
                for audio in resample_stream(map(decoder.feed, response.iter_bytes()), lambda: decoder.rate):
                    sent = True
                    yield audio
                if not sent:
                    raise APIError(f"TTS API at {self.base_url} sent no audio")


@dataclass
class Voice:
    """A reference voice to clone: one entry of ref.json."""
    name: str
    wav_path: str
    prompt_text: str


def load_voices(ref_dir: str) -> list:
    """ref_dir/ref.json: [{"ref_wav_path", "prompt_text"}, ...], the wav paths relative to ref_dir/ref_wav/
    (CleanS2S's layout) or to ref_dir."""
    index = os.path.join(ref_dir, "ref.json")
    if not os.path.isfile(index):
        raise SystemExit(f"--ref_dir {ref_dir}: no ref.json there (see ref_audio/ for the format)")
    voices = []
    for item in json.load(open(index, encoding="utf-8")):
        candidates = [os.path.join(ref_dir, "ref_wav", item["ref_wav_path"]), os.path.join(ref_dir, item["ref_wav_path"])]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise SystemExit(f"{index}: reference voice {item['ref_wav_path']} not found in {ref_dir}/ref_wav or {ref_dir}")
        voices.append(Voice(os.path.splitext(os.path.basename(path))[0], path, item["prompt_text"]))
    if not voices:
        raise SystemExit(f"{index} lists no voice")
    return voices


class CosyVoiceTTSHandler(TTSHandler):
    """CosyVoice-300M, CosyVoice2-0.5B and CosyVoice3 through the official `cosyvoice` package: zero-shot voice
    cloning from --ref_dir, streamed. Each reference is loaded once, at start; each session keeps one voice."""

    name = "cosyvoice"
    V3_PROMPT = "You are a helpful assistant.<|endofprompt|>"  # CosyVoice3 wants its prompt text to start so

    def __init__(self, model_dir: str, ref_dir: str, voice: str, fp16: bool, load_jit: bool, text_stream: bool):
        self.model_dir, self.ref_dir, self.voice_choice = model_dir, ref_dir, voice
        self.fp16, self.load_jit, self.reads_text_stream = fp16, load_jit, text_stream
        self.lock = threading.Lock()  # one synthesis at a time: the model object keeps per-call state

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--tts_model_name", default=None,
                           help="--tts cosyvoice: model directory (CosyVoice-300M, CosyVoice2-0.5B or Fun-CosyVoice3-0.5B); default pretrained_models/CosyVoice2-0.5B")
        group.add_argument("--tts_dtype", choices=["float32", "float16"], default="float32", help="--tts cosyvoice: precision (float16 needs CUDA)")
        group.add_argument("--ref_dir", default=None, help="--tts cosyvoice: folder of reference voices with ref.json (CleanS2S's format); default ref_audio")
        group.add_argument("--tts_voice", default="random", help="--tts cosyvoice: voice of each session: random, first, or a voice's file name without .wav")
        group.add_argument("--tts_text_stream", action="store_true",
                           help="--tts cosyvoice (2 and 3): feed the LLM's text to the TTS as it is written instead of sentence by sentence")
        group.add_argument("--tts_load_jit", action="store_true", help="--tts cosyvoice (300M and 2): load the JIT-compiled parts (CUDA)")
        group.add_argument("--cosyvoice_dir", default=None, help="--tts cosyvoice: a clone of the CosyVoice repository, added to the import path")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CosyVoiceTTSHandler:
        if args.cosyvoice_dir:  # a clone of the CosyVoice repository, and the Matcha-TTS it vendors
            sys.path[:0] = [args.cosyvoice_dir, os.path.join(args.cosyvoice_dir, "third_party", "Matcha-TTS")]
        return cls(args.tts_model_name or "pretrained_models/CosyVoice2-0.5B", args.ref_dir or "ref_audio",
                   args.tts_voice, args.tts_dtype == "float16", args.tts_load_jit, args.tts_text_stream)

    def describe(self) -> str:
        return (f"{self.family} {self.model_dir}, {self.rate} Hz, {'float16' if self.fp16 else 'float32'}, "
                f"voices {', '.join(v.name for v in self.voices)}{', text stream' if self.reads_text_stream else ''}")

    def setup(self) -> None:
        self.voices = load_voices(self.ref_dir)
        if self.voice_choice not in ("random", "first") and self.voice_choice not in [v.name for v in self.voices]:
            raise SystemExit(f"--tts_voice {self.voice_choice}: not in {self.ref_dir}/ref.json "
                             f"({', '.join(v.name for v in self.voices)})")
        if not os.path.isdir(self.model_dir):
            raise SystemExit(f"--tts_model_name {self.model_dir}: no such directory (download a CosyVoice model, see README)")
        cli = require("cosyvoice.cli.cosyvoice", "install CosyVoice from its repository (see README) and pass --cosyvoice_dir")
        families = {"cosyvoice.yaml": "CosyVoice", "cosyvoice2.yaml": "CosyVoice2", "cosyvoice3.yaml": "CosyVoice3"}
        family = next((f for y, f in families.items() if os.path.isfile(os.path.join(self.model_dir, y))), None)
        if family is None:
            raise SystemExit(f"--tts_model_name {self.model_dir}: not a CosyVoice model (no cosyvoice*.yaml)")
        flags = {"fp16": self.fp16, **({"load_jit": self.load_jit} if family != "CosyVoice3" else {})}
        self.model, self.family = getattr(cli, family)(self.model_dir, **flags), family
        self.rate = self.model.sample_rate
        self.first_hop = getattr(self.model.model, "token_hop_len", None)  # CosyVoice2/3: speech tokens in the first chunk
        if self.reads_text_stream and family == "CosyVoice":
            raise SystemExit("--tts_text_stream needs CosyVoice2 or CosyVoice3; CosyVoice-300M reads whole sentences")
        import transformers
        if self.reads_text_stream and major_version(transformers) >= 5:
            # Its text-stream LLM loop indexes the attention cache as transformers 4 did (cosyvoice/llm/llm.py,
            # inference_bistream): with 5 it fails in CosyVoice's own thread, and the call waits forever.
            raise SystemExit(f"--tts_text_stream needs transformers 4 (CosyVoice's requirements pin 4.51.3); this is "
                             f"{transformers.__version__}: install CosyVoice's requirements, or leave --tts_text_stream off")
        # Older releases take the prompt as a 16 kHz tensor, newer ones as a wav path: ask the signature.
        takes_tensor = "prompt_speech_16k" in inspect.signature(self.model.inference_zero_shot).parameters
        for v in self.voices:
            prompt_text = v.prompt_text
            if family == "CosyVoice3" and "<|endofprompt|>" not in prompt_text:
                prompt_text = self.V3_PROMPT + prompt_text
            prompt = self._prompt_tensor(v.wav_path) if takes_tensor else v.wav_path
            self.model.add_zero_shot_spk(prompt_text, prompt, v.name)

    @staticmethod
    def _prompt_tensor(path: str) -> Any:
        import soundfile
        import torch
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(resample(audio.mean(axis=1), rate))[None, :]

    def warmup(self) -> None:
        for _ in self.synthesize("Hello, this is a warm-up.", self.voices[0]):
            pass

    def voice_named(self, name: str) -> Optional[Voice]:
        return next((v for v in self.voices if v.name == name), None)

    def voice_names(self) -> list:
        return [v.name for v in self.voices]

    def choose_voice(self) -> Voice:
        if self.voice_choice == "random":
            return random.choice(self.voices)
        if self.voice_choice == "first":
            return self.voices[0]
        return next(v for v in self.voices if v.name == self.voice_choice)

    def synthesize(self, text: Any, voice: Any = None) -> Iterator[np.ndarray]:
        yield from resample_stream(self._model_audio(text, voice or self.voices[0]), lambda: self.rate)

    def _model_audio(self, text: Any, voice: Voice) -> Iterator[np.ndarray]:
        """CosyVoice's streamed chunks at its own rate, float32 mono."""
        with self.lock:
            if self.first_hop is not None:  # the model doubles it after every chunk and never resets it: without
                self.model.model.token_hop_len = self.first_hop  # this, every answer after the first starts with a 4 s chunk
            for out in self.model.inference_zero_shot(text, "", "", zero_shot_spk_id=voice.name, stream=True):
                yield out["tts_speech"].float().cpu().numpy().reshape(-1)


TTS_HANDLERS: dict = {"espeak": EspeakTTSHandler, "openai": OpenAITTSHandler, "cosyvoice": CosyVoiceTTSHandler}


# ------------------------------------------------------------------------------------------------
# The session: one user's conversation, with no socket in it. hear() and type() start turns, the stages above
# answer them, and output() gives back the session's events and its answer audio, paced to the client's playback.
# ------------------------------------------------------------------------------------------------

PLAYING_GRACE_S = 5.0  # a client's "playing" report outlasts the answer's audio by at most this: it cannot hold a session open
FAILED_SEQ = 2**31 - 1  # seq of the end marker of an answer whose stage failed


def uid_tag(uid: str) -> str:
    """What the logs call a session: a short hash of its uid, so a log reader cannot act as the client."""
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


class CutIn:
    """Speech over an extended client's answer, with --backchannels: the answer (`paused`) holds while the user
    speaks. Its words, when the ASR has them, decide (weigh): a backchannel or none lets the answer go on (go_on);
    anything else, or speech past --backchannel_max_ms, cuts it off and becomes the turn (take_turn). Until then the
    speech is a turn in waiting (`turn`): not the current turn, heard by the ASR only. One per session, on its event
    loop; `turn` is None while no one cuts in. Like Listener and Speaker, it keeps no reference to its session: each
    call is given it."""

    def __init__(self):
        self.turn: Optional[Turn] = None  # the speech, a turn in waiting
        self.paused: Optional[Turn] = None  # the answer it holds
        self.heard_at = 0.0  # when the speech was first heard
        self.paused_at = 0.0  # when the answer stopped for the user: its barge-in, if it is cut off
        self.held: list = []  # the speech's transcript events: said only if it takes the turn

    def holds(self, turn: int) -> bool:
        """Whether `turn` is the turn in waiting (none once the session has closed: it drops it)."""
        held = self.turn  # (once: worker threads ask while the loop changes it)
        return held is not None and held.number == turn

    def may_pause(self, s: Session) -> bool:
        return (s.listener.backchannels is not None and s.can_pause and s.args.interrupt_at == "speech_start"
                and (self.turn is not None or s.assistant_busy()))

    def pause_for(self, s: Session, heard_at: float) -> Turn:
        """Hold the answer while the user speaks; the speech gets a turn in waiting. New speech while the words of the
        last are still with the ASR takes its place (the answer stays paused)."""
        pausing = self.drop(s) is None
        self.turn, self.held = Turn(s.waiting_number(), spoken=True), []
        s.turns[self.turn.number] = self.turn
        if pausing:
            s.speaker.pause(s.turn)
            self.paused, self.heard_at, self.paused_at = s.current(), heard_at, s.speaker.paused_at
            s.loop.call_later(AUDIO_GAP_S, self._check, s, self.paused_at)
        return self.turn

    def _check(self, s: Session, paused_at: float) -> None:
        """A client that stops sending audio in the middle of the speech (muted mid-word) leaves the VAD undecided:
        the answer goes on, and the VAD starts afresh when audio comes again."""
        if self.turn is None or self.paused_at != paused_at:
            return
        if self.turn.state is TurnState.HEARING and now() - s.listener.heard_audio_at > AUDIO_GAP_S:
            s.listener.forget()
            self.go_on(s, "")
        else:
            s.loop.call_later(AUDIO_GAP_S, self._check, s, paused_at)

    def weigh(self, s: Session, text: UserText) -> None:
        """The ASR's words for the speech: a backchannel lets the answer go on; anything else takes the turn."""
        if not self.holds(text.turn):  # it took the turn meanwhile (it went on too long), or was dropped
            if s.wants(text.turn):
                s.pipeline.llm.put(text)
            return
        if s.listener.is_backchannel(text.text):
            self.go_on(s, text.text)
        else:
            self.take_turn(s)
            s.pipeline.llm.put(text)

    def take_turn(self, s: Session) -> None:
        """The speech cuts the paused answer off: its turn in waiting becomes the next turn."""
        waiting, held = self.turn, self.held
        self.turn, self.held = None, []
        waiting.number = s.turn + 1  # its stages' messages still say its waiting number, which stays
        s.make_current(waiting, self.heard_at, self.paused_at)
        s.speaker.put(SpeechStartEvent(waiting.number))
        for event in held:
            s.emit(event)

    def go_on(self, s: Session, heard: str) -> None:
        """The speech was a backchannel or a noise: the answer plays on from where it stopped."""
        self.drop(s)
        self.paused.resumed += 1
        s.speaker.resume(self.paused.number, heard)

    def drop(self, s: Session) -> Optional[Turn]:
        """Forget the turn in waiting (its ASR result will find no one); the answer stays paused."""
        waiting, self.turn = self.turn, None
        if waiting is not None:
            waiting.cancel()
            s.turns.pop(waiting.number, None)
        return waiting


class Speculation:
    """A tentative answer (--speculate): at a pause in the user's speech, the ASR, LLM and TTS start on the utterance
    so far as a turn of their own (`turn`, a number the client never sees), and nothing of it goes out. If the pause
    ends the user's turn, it becomes that turn's answer and what it made goes out at once (take); if the user speaks
    on, it is dropped, and no one hears of it. One per session, on its event loop; `turn` is None while there is none.
    It keeps no reference to its session: each call is given it."""

    def __init__(self):
        self.turn: Optional[Turn] = None
        self.speech_ms = 0.0  # voice in the utterance when it started
        self.held: list = []  # its events and audio, in order

    def holds(self, turn: int) -> bool:
        """Whether `turn` is the tentative answer's (none once the session has closed: it drops it)."""
        held = self.turn  # (once: worker threads ask while the loop changes it)
        return held is not None and held.number == turn

    def start(self, s: Session, audio: np.ndarray, speech_ms: float) -> None:
        """The user paused: answer what they said so far, in a turn of its own that no one hears of yet."""
        self.drop(s)
        if s.current().state is not TurnState.HEARING or not s.answers():
            return
        tentative = Turn(s.waiting_number(), spoken=True, state=TurnState.ANSWERING, continues=s.current().continues)
        tentative.times.speculated_at = now()
        s.turns[tentative.number] = tentative
        self.turn, self.speech_ms, self.held = tentative, speech_ms, []
        s.pipeline.asr.put(Utterance(s, tentative.number, audio))

    def spoke_on(self, s: Session, speech_ms: float) -> None:
        """The utterance has this much voice in it now: a tentative answer to less is dropped."""
        if self.turn is not None and speech_ms > self.speech_ms:
            self.drop(s)

    def failed(self, s: Session, turn: int) -> None:
        """A stage failed it: the turn's end starts it again."""
        if self.holds(turn):
            self.drop(s)

    def drop(self, s: Session) -> None:
        """Forget the tentative answer: its work is stale, it leaves the history, and the turn counts what it cost."""
        tentative, self.turn = self.turn, None
        if tentative is None:
            return
        tentative.cancel()
        s.turns.pop(tentative.number, None)
        s.history.drop(tentative)
        t = s.current()
        if t is not None:
            t.speculations_discarded += 1
            t.llm_requests_discarded += tentative.llm_requests

    def take(self, s: Session, speech_ms: float) -> bool:
        """The user's turn has ended: if the tentative answer heard all of it, it becomes the turn (under its number,
        with the turn's timings and what earlier ones cost), and what it made so far goes out. Else it is dropped."""
        if self.turn is None or speech_ms != self.speech_ms or self.turn.state is not TurnState.ANSWERING:
            self.drop(s)
            return False
        taken, held = self.turn, self.held
        self.turn, self.held = None, []
        heard = s.current()
        taken.number, taken.speculated, taken.heard_audio = heard.number, True, heard.heard_audio
        taken.times.speech_end, taken.times.eot_wait_ms = heard.times.speech_end, heard.times.eot_wait_ms
        taken.times.turn_model_ms = heard.times.turn_model_ms
        taken.speculations_discarded, taken.llm_requests_discarded = heard.speculations_discarded, heard.llm_requests_discarded
        heard.cancel()
        s.turns[heard.number] = taken  # its stages' messages still say its own number, which stays
        for item in held:
            s.emit(item)
        return True


class Session:
    """One user's conversation: what it hears (Listener, with the turn-taking), its turns and history, and what goes
    back to the client (Speaker). It knows no socket: a wire adapter (further down) turns a client's messages into
    hear(), type(), played() and new_topic(), and output() into messages. Turn state changes on the event loop;
    worker threads read `turn`, fill timings in Turn records and hand results back through send_event() and
    deliver(), which are thread-safe."""

    def __init__(self, uid: str, pipeline: Pipeline, args: argparse.Namespace, legacy: bool = False,
                 on_turn_end: Optional[Callable[[Session, Turn, bool], None]] = None):
        self.uid, self.tag, self.pipeline, self.args = uid, uid_tag(uid), pipeline, args
        self.loop = asyncio.get_running_loop()
        self.on_turn_end = on_turn_end  # (session, turn, again): the server's metrics and --save_data, as each turn ends
        self.turn = 0  # CleanS2S's user_input_count: +1 per utterance start and per text input
        self.unseen = 0  # the last number given to a turn in waiting (a cut-in's, a speculation's): -1, -2, ...
        self.turns: dict = {}  # the current turn and the one before it, and turns in waiting (a speculation taken: under both numbers)
        self.cut_in = CutIn()
        self.speculation = Speculation()
        self.history = ChatHistory(args.chat_size)
        self.listener = Listener(args, pipeline)
        self.voice: Any = None  # the TTS voice this session speaks with, chosen at its first answer
        self.tools: list = []  # functions the LLM may call, in the chat API's form (an OpenAI Realtime client's)
        self.tool_choice: Any = "auto"
        self.save_dir: Optional[str] = None  # --save_data: this session's folder, named at its first saved file
        self.closed = False
        self.speaker = Speaker(args, legacy)
        self.can_pause = not legacy  # the client holds its playback on a pause (see CutIn); a wire adapter may say no

    # ---- what the client does ----

    async def hear(self, audio: np.ndarray) -> None:
        """The client's audio (float32 in [-1, 1], --sample_rate, mono), heard in the background (Listener.hear)."""
        await self.listener.hear(self, audio)

    async def caught_up(self) -> int:
        """Wait until the client's audio so far has been heard; how many user turns it started since the last call."""
        return await self.listener.caught_up()

    def type(self, text: str) -> None:
        """Text the user typed: a turn of its own, straight to the LLM. "new topic" clears the history instead (and,
        as CleanS2S's client counts it, takes a turn number)."""
        if text == "new topic":
            self.new_topic()
            return
        t = self.start_turn(spoken=False)
        t.question, t.times.speech_end = text, now()
        t.move(TurnState.ANSWERING)
        self.pipeline.llm.put(UserText(self, t.number, text))

    def new_topic(self) -> None:
        self.start_turn(spoken=False).move(TurnState.SENT)
        self.history.clear()

    def played(self, turn: Optional[int], played_ms: Optional[float], playing: Optional[bool]) -> None:
        """The client's word on a turn's playback (None: the current turn): how much of it it played, whether it
        still plays."""
        turn = self.turn if turn is None else turn
        if playing is not None:
            self.speaker.client_playing_turn = turn if playing else None
        if played_ms is not None and turn in self.turns:
            self.turns[turn].played_ms = played_ms

    def output(self) -> AsyncIterator[Any]:
        return self.speaker.output(self)

    def leave(self) -> None:
        """The client is gone, and may come back: its answer stops, and the utterance cut off with its connection is
        not continued by the next one's audio."""
        self.stop_answer()
        self.listener.forget()

    def stop_answer(self) -> None:
        """The turn under way becomes stale, and so does all its queued work."""
        self.cut_in.drop(self)
        self.speculation.drop(self)
        self.speaker.paused_turn = None  # no one hears a resume: the client left, or the session ends
        t = self.current()
        if t is not None:
            t.cancel()
            if not t.over:
                t.move(TurnState.INTERRUPTED)
                self.report_turn(t)

    def close(self) -> None:
        """The session ends: every queued and running piece of work for it becomes stale, and output() ends."""
        self.stop_answer()
        self.closed = True
        self.speaker.put(None)

    # ---- turns (event loop) ----

    def is_current(self, turn: int) -> bool:
        record = self.turns.get(turn)  # (once: worker threads ask while the loop changes the dict)
        return not self.closed and record is not None and record is self.current()

    def wants(self, turn: int) -> bool:
        """Whether work for this turn is still wanted: it is current (or a cut-in's, for the ASR, or a tentative
        answer's), not cancelled, and its answer is still being made (no stage has failed it, and not all of it has
        gone out)."""
        record = self.turns.get(turn)  # (once: worker threads ask while the loop changes the dict)
        working = (TurnState.HEARING, TurnState.ANSWERING, TurnState.SPEAKING)
        if self.closed or record is None or record.state not in working or record.cancelled.done():
            return False
        return record is self.current() or self.cut_in.holds(turn) or self.speculation.holds(turn)

    def turn_record(self, number: int) -> Turn:
        return self.turns[number]

    def current(self) -> Optional[Turn]:
        return self.turns.get(self.turn)

    def assistant_busy(self) -> bool:
        return self.speaker.busy(self.current())

    def answers(self) -> bool:
        """Whether a turn the user ends is answered (an OpenAI Realtime client may say no)."""
        return True

    def waiting_number(self) -> int:
        """A turn in waiting's number, below zero: the client never sees it (it gets the turn's own if it is taken),
        so the turns it sees are numbered 1, 2, 3... as CleanS2S's client counts them."""
        self.unseen -= 1
        return self.unseen

    def start_turn(self, spoken: bool, heard_at: Optional[float] = None) -> Turn:
        """A new turn makes the running one stale (a paused answer too: it is cut off). Returns the new turn's record."""
        self.cut_in.drop(self)
        self.speculation.drop(self)
        return self.make_current(Turn(self.turn + 1, spoken), heard_at, now())

    def make_current(self, record: Turn, heard_at: Optional[float], stopped_at: float) -> Turn:
        """`record` becomes the current turn; the answer under way, if any, is cut off (the user heard it stop at
        `stopped_at`)."""
        old = self.current()
        if old is not None and self.assistant_busy():
            was_sent = old.state is TurnState.SENT  # all sent but still playing: reported once already
            old.move(TurnState.INTERRUPTED)
            self.speaker.interrupt(old.number)
            old.times.barge_in_ms = round((stopped_at - (heard_at or stopped_at)) * 1000, 1)
            started = old.times.first_audio_sent
            old.times.answer_heard_ms = 0.0 if started is None else max(0.0, round(((heard_at or stopped_at) - started) * 1000, 1))
            self.report_turn(old, again=was_sent)
            if record.spoken and self.carries_on(old):
                record.continues, old.carried_on, old.continues = old, True, None  # (a chain holds two turns at most)
        if old is not None:
            old.cancel()
        self.turn = record.number
        self.turns = {n: t for n, t in self.turns.items() if n >= self.turn - 1 or t is old or t is record}
        self.turns[self.turn] = record
        return record

    def carries_on(self, old: Turn) -> bool:
        """Whether speech that cut off the answer to the user's turn `old` carries that turn on: the user had heard
        less than --continue_turn_ms of the answer (none, if its audio had not started), too little to be answering it."""
        return old.spoken and old.times.answer_heard_ms < self.args.continue_turn_ms

    def start_spoken_turn(self, heard_at: Optional[float]) -> Turn:
        """The user is speaking: a new turn starts, cutting off the assistant's answer if one is under way; over an
        extended client's answer, with --backchannels, the answer pauses instead (see CutIn)."""
        if self.cut_in.may_pause(self):
            return self.cut_in.pause_for(self, heard_at or now())
        t = self.start_turn(spoken=True, heard_at=heard_at)
        self.speaker.put(SpeechStartEvent(t.number))
        return t

    def speech_ended(self, t: Turn) -> None:
        """The user's turn `t` has ended; its words go to the ASR (or a tentative answer has them already)."""
        self.speaker.put(SpeechEndEvent(t.number))

    def finish_turn(self, t: Turn) -> None:
        if t.move(TurnState.SENT):
            self.report_turn(t)

    def report_turn(self, t: Turn, again: bool = False) -> None:
        """One log line and a metrics event for a turn that ended; `again` when its audio was all sent and the user cut
        in while it still played (its figures are counted once, its barge-in then)."""
        m = t.metrics()
        logger.info("turn session=%s turn=%d %s", self.tag, t.number, " ".join(f"{k}={v}" for k, v in m.items() if v is not None),
                    extra={"fields": {"session": self.tag, "turn": t.number, **m}})
        self.speaker.put(MetricsEvent(t.number, m))
        if self.on_turn_end is not None:
            self.on_turn_end(self, t, again)

    def emit(self, item: ServerEvent | AnswerAudio) -> None:
        """To the client, under the turn's number; a cut-in's words and a tentative answer are held."""
        turn = getattr(item, "turn", None)
        record = self.turns.get(turn)
        if turn is not None and record is None:  # stale work of a turn long gone, or of a turn in waiting dropped unheard
            return
        if self.cut_in.holds(turn):  # said if it takes the turn
            self.cut_in.held.append(item)
        elif self.speculation.holds(turn):  # said if the user's turn ends with no more words
            self.speculation.held.append(item)
        else:
            if record is not None and record.number != turn:  # a tentative answer taken: the client knows its turn's number
                item = dataclasses.replace(item, turn=record.number)
            if isinstance(item, TranscriptEvent) and item.final and record is not None and record.continues is not None:
                item = dataclasses.replace(item, continues=record.continues.number)  # (known once the turn was taken)
            self.speaker.put(item)

    # ---- what the stages ask of it and hand back (worker threads, thread-safe) ----

    def prompt(self, turn: Turn, role: str, prompt: str, question: str) -> list:
        """The messages the LLM answers `turn` from: the opening prompt, the history, the question (carrying on the
        question of the turn it continues); the turn joins the history. (An OpenAI Realtime session builds them from
        its conversation instead.)"""
        if turn.continues is not None and turn.continues.question:
            # (its last --max_text_chars: a client that cuts in after every answer's start grows no question without end)
            turn.question = question = joined(turn.continues.question, question)[-self.args.max_text_chars:]
        messages = self.history.messages(role, prompt, question)
        self.history.add(turn)
        return messages

    def speaks(self, turn: int) -> bool:
        """Whether the answer to `turn` is spoken: its text goes to the TTS (else it goes out as text alone)."""
        return True

    def transcribed(self, text: UserText) -> None:
        """The ASR's words for a turn: on to the LLM; a cut-in's are first weighed on the loop."""
        if self.cut_in.holds(text.turn):
            self._call_from_thread(self.cut_in.weigh, self, text)
        else:
            self.pipeline.llm.put(text)

    def send_event(self, event: ServerEvent) -> None:
        self._call_from_thread(self.emit, event)

    def deliver(self, item: AnswerAudio) -> None:
        self._call_from_thread(self.emit, item)

    def _call_from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: so has the session, and no one would hear it
            self.loop.call_soon_threadsafe(fn, *args)

    def fail_turn(self, turn: int, code: str, message: str) -> None:
        """End a turn whose stage raised: the client hears an error, later turns go on. Speech over a paused answer
        that the ASR could not hear is taken for a noise: the answer goes on. A tentative answer that fails is dropped:
        the turn's end starts it again."""
        if self.cut_in.holds(turn):
            self._call_from_thread(self.cut_in.weigh, self, UserText(self, turn, ""))
            return
        if self.speculation.holds(turn):
            self._call_from_thread(self.speculation.failed, self, turn)
            return
        record = self.turns.get(turn)
        if record is not None:
            record.move(TurnState.FAILED)
        self.send_event(ErrorEvent(code, message, turn))
        self.deliver(AnswerAudio(self, turn, FAILED_SEQ, "", b"", last=True))


# CleanS2S's client queues each audio message 200 ms after it arrives, and an interrupt clears only what is queued:
# audio that arrived in the 200 ms before it still plays. So nothing is sent to it while the user may be that close
# (plus audio on its way to the VAD) to cutting in.
LEGACY_QUEUE_DELAY_S = 0.2
CUT_IN_MARGIN_S = 0.1
AUDIO_GAP_S = 0.5  # a client that sends no audio for this long is not about to cut in (a microphone sends every ~64 ms)
# How long a chunk that ends a sentence waits for the answer's end, to carry its end_flag (see LegacyAnswer): the
# LLM's end follows the last sentence by about a token (a local model on a CPU writes ~10 a second).
LEGACY_END_WAIT_S = 0.1


class Speaker:
    """What goes back to one session's client, in order: its events at once, its answer audio paced to the
    client's playback. Filled by the session and its stages; at most one answer (--lm_max_new_tokens) waits here,
    since whoever reads output() hands every message on without waiting (a slow client costs only its writer).
    It keeps no reference to its session (output() is given it), so a closed session is freed at once, without
    waiting for the garbage collector to find a cycle."""

    NUDGE = "nudge"  # in the outbox: only wakes output() for an urgent event (a pause, a resume)

    def __init__(self, args: argparse.Namespace, legacy: bool):
        self.args = args
        self.outbox: asyncio.Queue = asyncio.Queue()  # ServerEvents and AnswerAudio; None ends output()
        self.wake = asyncio.Event()  # ends a pacing wait at once: an interrupt, or new audio heard during a hold
        self.play_start = 0.0  # loop clock when the current answer's audio would have started playing
        self.client_playing_turn: Optional[int] = None  # the turn the client last said it was playing
        # CleanS2S's own client: answers cut its way (LegacyAnswer), and nothing sent while the user may cut in.
        self.legacy_answer = LegacyAnswer() if legacy else None
        self.holding = False  # a legacy answer waits to see whether the user cuts in
        # A pause and a resume go out before any more audio, even one that waits for its moment (output() sends them).
        self.urgent: deque = deque()
        self.paused_turn: Optional[int] = None  # the answer whose playback the client holds (see CutIn)
        self.paused_at = 0.0

    def put(self, item: Any) -> None:
        self.outbox.put_nowait(item)

    def busy(self, t: Optional[Turn]) -> bool:
        """An answer is being made (the user's turn has ended) or is still playing. The client's word that it is
        playing counts only for the current answer, and only a little past the end of its audio."""
        if t is None or t.state is TurnState.HEARING:
            return False
        if self.paused_turn == t.number:
            return True
        audio_end = self.play_start + t.audio_sent_ms / 1000
        client_playing = self.client_playing_turn == t.number and now() < audio_end + PLAYING_GRACE_S
        return not t.over or now() < audio_end or client_playing

    def interrupt(self, turn: int) -> None:
        """The user cut in: nothing queued of the answer goes out (errors and figures do), and an interrupt event does."""
        kept = []
        while not self.outbox.empty():
            item = self.outbox.get_nowait()
            if isinstance(item, (ErrorEvent, MetricsEvent)) or (isinstance(item, ServerEvent) and not item.extended):
                kept.append(item)  # (the Realtime adapter's events: it orders a response's end itself)
        for item in kept + [InterruptEvent(turn)]:
            self.outbox.put_nowait(item)
        self.paused_turn = None
        self.wake.set()

    def pause(self, turn: int) -> None:
        """The client holds this answer's playback (keeping what it has), and nothing more of it goes out."""
        self.paused_turn, self.paused_at = turn, now()
        self._send_first(PauseEvent(turn))

    def resume(self, turn: int, heard: str) -> None:
        """Playback goes on where it stopped; the client's clock stood still meanwhile, and so does the pacing's."""
        if self.paused_turn != turn:
            return
        self.play_start += now() - self.paused_at
        self.paused_turn = None
        self._send_first(ResumeEvent(turn, heard))

    def _send_first(self, event: ServerEvent) -> None:
        self.urgent.append(event)
        self.outbox.put_nowait(self.NUDGE)  # output() may be waiting for the outbox
        self.wake.set()  # or for an audio piece's moment

    def heard_more(self) -> None:
        if self.holding:  # a hold waits to see whether the user cuts in: the VAD has heard more
            self.wake.set()

    async def output(self, session: Session) -> AsyncIterator[Any]:
        """Everything for the client, in order, until the session closes: ServerEvents as they come, AnswerAudio when
        its playback nears (a legacy client's cut by LegacyAnswer)."""
        legacy = self.legacy_answer
        while True:
            while self.urgent:
                yield self.urgent.popleft()
            try:
                async with asyncio.timeout(LEGACY_END_WAIT_S if legacy is not None and legacy.waiting else None):
                    item = await self.outbox.get()
            except TimeoutError:  # a legacy chunk that ends a sentence waited for the answer's end in vain
                pieces = legacy.flush()
            else:
                if item is None:
                    return
                if item is self.NUDGE:  # the urgent events go out at the top of the loop
                    continue
                if isinstance(item, ServerEvent):
                    yield item
                    continue
                pieces = legacy.push(item) if legacy is not None else [item]
            for piece in pieces:
                while True:  # a pause or resume that comes while this piece waits goes out first; then it waits again
                    while self.urgent:
                        yield self.urgent.popleft()
                    try:
                        ready = await self._ready(session, piece)
                    except Exception:
                        logger.exception("sender failed on session %s", session.tag)
                        ready = None
                    if not self.urgent:
                        break
                if ready is not None:
                    yield ready

    async def _ready(self, session: Session, item: AnswerAudio) -> Optional[AnswerAudio]:
        """Wait for this piece's moment and count it as sent; None if it must not go out (stale, or empty)."""
        if not session.is_current(item.turn) or not (item.pcm or item.text or item.last):  # (a chunk's end, for legacy)
            return None
        t = session.turns[item.turn]
        if t.over:  # its end was sent (an early end, if a stage failed): nothing of it may follow
            return None
        await self._pace(session, t)
        if not session.is_current(item.turn) or self.urgent:  # interrupted while waiting, or a pause goes first
            return None
        if t.messages_sent == 0:
            if item.last and not item.text and not item.pcm:  # an empty answer: nothing to send
                session.finish_turn(t)
                return None
            if t.spoken:  # CleanS2S's client shows the question with the answer's first message
                item = dataclasses.replace(item, question=t.question)
        t.messages_sent += 1
        t.move(TurnState.SPEAKING)
        moment = now()
        if item.pcm and t.times.first_audio_sent is None:
            t.times.first_audio_sent = moment
            self.play_start = moment
        if item.pcm and moment > self.play_start + t.audio_sent_ms / 1000:  # the client ran dry: its clock restarts
            self.play_start = moment - t.audio_sent_ms / 1000
        if item.text:
            t.answer_chunks.append((t.audio_sent_ms, item.text))
        if item.pcm:
            t.answer_audio.append(item.pcm)
            t.audio_sent_ms += len(item.pcm) / 2 / SAMPLE_RATE * 1000
        if item.last:
            session.finish_turn(t)
        return item

    async def _pace(self, session: Session, t: Turn) -> None:
        """Wait until this audio is within --playback_lead_ms of the client's playback position, and, for a legacy
        client, while the user may be about to cut in; a paused answer, until it goes on. An interrupt, a pause or
        resume to send, or new audio heard ends a wait at once."""
        lead_s = self.args.playback_lead_ms / 1000
        while session.is_current(t.number) and not self.urgent:
            wait_s: Optional[float] = 0.0
            if lead_s > 0 and t.audio_sent_ms > 0:
                wait_s = self.play_start + t.audio_sent_ms / 1000 - now() - lead_s
            # If the client's audio stops in the middle of a sound, the VAD cannot decide: the hold ends soon after.
            hold_until = session.listener.heard_audio_at + AUDIO_GAP_S
            self.holding = self.cut_in_may_come(session) and now() < hold_until
            if self.holding:
                wait_s = max(wait_s, hold_until - now())
            if self.paused_turn == t.number:
                wait_s = None  # until it goes on or is cut off
            elif wait_s <= 0:
                return
            self.wake.clear()
            try:
                async with asyncio.timeout(wait_s):  # (not wait_for: that starts a task for every audio piece)
                    await self.wake.wait()
            except TimeoutError:
                pass
            finally:
                self.holding = False

    def cut_in_may_come(self, session: Session) -> bool:
        """For a legacy client: could the user's speech start a turn, and so interrupt this answer, before audio sent
        now is queued by the client (LEGACY_QUEUE_DELAY_S)?"""
        if self.legacy_answer is None or not self.args.enable_interruption:
            return False
        due_ms = session.listener.vad.turn_due_ms(at_end=self.args.interrupt_at == "speech_end")
        return due_ms is not None and due_ms / 1000 < LEGACY_QUEUE_DELAY_S + CUT_IN_MARGIN_S


# ------------------------------------------------------------------------------------------------
# Main: build the handlers from the flags, load and warm them up, serve.
# ------------------------------------------------------------------------------------------------

class Pipeline:
    """The models every session shares, wired in the order an utterance takes them: the VAD (batched across the
    sessions; the turn model on a small pool of threads), then ASR -> LLM -> TTS, each stage handing what it makes to
    the next; the TTS's audio goes back to its session."""

    def __init__(self, args: argparse.Namespace, asr: ASRHandler, llm: LLMHandler, tts: TTSHandler, vad_model: Any,
                 turn_model: Optional[SmartTurn] = None):
        self.vad_model, self.turn_model = vad_model, turn_model
        self.turn_pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="turn")
        self.vad = VADBatcher(vad_model)
        self.asr = Stage("asr", asr, args.asr_workers, lambda text: text.session.transcribed(text))
        # The LLM waits on the network, so there is a worker for every session: one slow stream holds no one else.
        self.llm = Stage("llm", llm, args.max_sessions, self.speak)
        self.tts = Stage("tts", tts, args.tts_workers, lambda audio: audio.session.deliver(audio))
        self.stages = (self.asr, self.llm, self.tts)

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    def speak(self, chunk: AnswerText) -> None:
        """An LLM chunk to the TTS; an answer that is not spoken (a Realtime client's text response) goes out as text."""
        if chunk.session.speaks(chunk.turn):
            self.tts.put(chunk)
        else:
            chunk.session.deliver(AnswerAudio(chunk.session, chunk.turn, chunk.seq, chunk.text, b"", chunk.last))

    def running(self) -> bool:
        return all(t.is_alive() for stage in self.stages for t in stage.threads)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Every stage stops, as Stage.stop says, within `timeout_s` in all."""
        for stage in self.stages:
            stage.close()
        deadline = time.monotonic() + timeout_s
        for stage in self.stages:
            stage.join(deadline)
        self.turn_pool.shutdown(wait=False)


def major_version(module: Any) -> int:
    """5 for a module whose __version__ is "5.23.0"."""
    return int(module.__version__.split(".")[0])


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def build_handlers(args: argparse.Namespace) -> tuple:
    """Pick each stage's handler by name; each reads its own flags."""
    return (ASR_HANDLERS[args.asr].from_args(args), LLM_HANDLERS[args.llm].from_args(args),
            TTS_HANDLERS[args.tts].from_args(args))


def parse_args(argv: Optional[list] = None, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.llm is None:  # what a CleanS2S launch command means; with no LLM flag, a key in the environment decides
        api = args.enable_llm_api or args.lm_model_url or (os.environ.get("LLM_API_KEY") and not args.lm_model_name)
        args.llm = "openai" if api else "transformers"
    if args.enable_llm_api and args.llm != "openai":
        parser.error(f"--enable_llm_api contradicts --llm {args.llm}")
    args.lm_model_url = args.lm_model_url or "https://api.openai.com/v1"
    args.lm_model_name = args.lm_model_name or {"openai": "gpt-4o-mini", "transformers": DEFAULT_LOCAL_LLM}.get(args.llm)
    if args.tts is None:
        args.tts = "cosyvoice" if args.tts_model_name else "espeak"
    if min(args.sample_rate, args.max_sessions, args.asr_workers, args.tts_workers) <= 0:
        parser.error("--sample_rate, --max_sessions, --asr_workers and --tts_workers must be positive")
    if (args.lm_prefix_cache or 0) < 0:
        parser.error("--lm_prefix_cache must be 0 (off) or more")
    if not 0 < args.turn_pause_ms < args.max_turn_silence_ms or args.turn_reask_ms < 0 or args.speculate_pause_ms <= 0:
        parser.error("--turn_pause_ms must be positive and shorter than --max_turn_silence_ms, --turn_reask_ms 0 or more, "
                     "and --speculate_pause_ms positive")
    if args.continue_turn_ms < 0:
        parser.error("--continue_turn_ms must be 0 (off) or more")
    args.auth_token = args.auth_token or os.environ.get("S2S_AUTH_TOKEN") or None
    if args.auth_token and not re.fullmatch(r"[A-Za-z0-9._~-]{8,256}", args.auth_token):
        parser.error("--auth_token must be 8-256 letters, digits or . _ ~ - (it travels in a URL or a subprotocol name); "
                     "make one with: openssl rand -hex 16")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl_certfile and --ssl_keyfile go together")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path and not os.path.isfile(path):
            parser.error(f"TLS file {path} does not exist")
    if min(args.max_message_kb, args.max_audio_ms_per_message, args.max_text_chars, args.max_messages_per_s,
           args.max_audio_ahead_s) <= 0:
        parser.error("--max_message_kb, --max_audio_ms_per_message, --max_text_chars, --max_messages_per_s and "
                     "--max_audio_ahead_s must be positive")
    for flag in ("public_receiver_url", "public_sender_url"):
        if getattr(args, flag) is not None and public_socket(getattr(args, flag)) is None:
            parser.error(f"--{flag} must be ws://HOST[:PORT][/PATH], wss://HOST[:PORT][/PATH] or :PORT")
    args.client_dir = find_client_dir(args.client_dir)
    if args.client_dir and not os.path.isfile(os.path.join(args.client_dir, "index.html")):
        parser.error(f"--client_dir {args.client_dir} has no index.html: build the client first (cd frontend_nextjs && npm run build)")
    return args


def raise_descriptor_limit() -> None:
    """Every connection is a file descriptor, and systemd's default soft limit is 1024: take the hard limit (often
    524288), so the limits on connections, not the process's descriptors, decide who gets in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load(name: str, component: Any) -> None:
    """Load and warm up one model, and say in one line what it is and what it cost. A failure stops
    start-up with one sentence (the traceback is logged at DEBUG)."""
    t0 = now()
    try:
        component.setup()
        t1 = now()
        if hasattr(component, "warmup"):
            component.warmup()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        logger.debug("%s failed to start", name, exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]  # funasr appends a list of 40 failed imports
        raise SystemExit(f"{name} could not start: {type(exc).__name__}: {first_line}") from None
    describe = component.describe() if hasattr(component, "describe") else type(component).__name__
    logger.info("%s: %s, load %.2f s, warm-up %.2f s", name, describe, t1 - t0, now() - t1)


def setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.getLogger().handlers[0]
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    if args.log_level != "DEBUG":  # libraries that log to the root logger (funasr: "download models from model hub")
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.ERROR)
    # The websockets library logs two lines for every connection at INFO, which a flood of connections turns into a
    # flood of log (the server logs sessions itself), and every handshake header at DEBUG, the token among them.
    logging.getLogger("websockets").setLevel(logging.INFO if args.log_level == "DEBUG" else logging.WARNING)


def main(argv: Optional[list] = None, parser: Optional[argparse.ArgumentParser] = None,
         handlers: Callable[[argparse.Namespace], tuple] = build_handlers) -> None:
    """Serve until SIGINT/SIGTERM. A variant (s2s_server_pipeline_rag.py) passes its own parser, with more flags,
    and its own `handlers`, which builds the (ASR, LLM, TTS) handlers from the parsed flags."""
    args = parse_args(argv, parser)
    setup_logging(args)
    if args.tts != "cosyvoice" and (args.tts_model_name or args.ref_dir):
        logger.warning("--tts_model_name/--ref_dir are for --tts cosyvoice; the %s TTS ignores them", args.tts)
    if (taken := taken_port(args)):
        raise SystemExit(taken)
    ops = OpsEndpoints(args.auth_token)
    if args.ops_port:  # up before the models load: /healthz says 503 until the server is ready
        ops.serve_http(args.recv_host, args.ops_port)
    if args.llm == "transformers" and args.lm_model_name == DEFAULT_LOCAL_LLM:
        logger.info("LLM: the local %s (an API instead: set LLM_API_KEY, or --llm openai; a microphone check: --llm echo)",
                    DEFAULT_LOCAL_LLM)
    asr, llm, tts = handlers(args)
    vad_model = VAD_MODELS[args.vad](args.vad_thresh if args.vad == "silero" else args.webrtc_mode)
    turn_model = SmartTurn(args.smart_turn_model, args.smart_turn_threshold) if args.turn_detection == "smart_turn" else None
    for name, component in (("VAD", vad_model), ("turn model", turn_model), ("ASR", asr), ("LLM", llm), ("TTS", tts)):
        if component is not None:
            load(name, component)
    llm.text_stream = tts.reads_text_stream
    if args.speculate and not speculates(args, asr):
        logger.warning("--speculate is off: a tentative answer needs the utterance whole (not a streaming ASR) and a "
                       "turn that starts with the speech (not --interrupt_at speech_end)")
    server = VoiceAgentServer(args, Pipeline(args, asr, llm, tts, vad_model, turn_model), ops)
    # The libraries and models leave about half a million long-lived objects. A full garbage collection walks them
    # all (~250 ms on 2 cores) and holds every thread meanwhile, at a moment no one chooses: mid-turn. Collect once
    # now and put them out of the collector's sight, so later collections see only what turns allocate.
    gc.collect()
    gc.freeze()
    raise_descriptor_limit()
    try:
        asyncio.run(server.run())
    except OSError as exc:  # taken while the models loaded
        if exc.errno != errno.EADDRINUSE:
            raise
        raise SystemExit(f"{exc.strerror} (is another server running?)") from None


# ------------------------------------------------------------------------------------------------
# Wire formats: what a client's messages mean to its session, and how the session's output is written for it.
# CleanS2S's format (its own client, which knows no session key) and the extended protocol of docs/protocol.md,
# which adds binary audio, playback reports and events to it. They only translate: a session is the same for both.
# ------------------------------------------------------------------------------------------------

class BadMessage(ValueError):
    """A client message we cannot use; `code` goes to the client in an error event."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


UID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")  # safe in file names (--save_data) and logs


def check_uid(uid: Any) -> str:
    if not isinstance(uid, str) or not UID.fullmatch(uid):
        raise BadMessage("bad_uid", "uid must be 1-64 letters, digits, '_', '-' or '.', not starting with '.'")
    return uid


@dataclass
class ClientAudio:  # -> Session.hear()
    audio: np.ndarray  # float32 in [-1, 1], the client's --sample_rate, mono


@dataclass
class ClientText:  # -> Session.type()
    text: str


@dataclass
class ClientPlayback:  # -> Session.played()
    turn: Optional[int]  # None: the current turn (CleanS2S's is_playing names none)
    played_ms: Optional[float] = None
    playing: Optional[bool] = None


def parse_json(message: str) -> dict:
    try:
        data = json.loads(message)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting like [[[[...
        raise BadMessage("bad_json", f"message is not JSON: {str(exc)[:100]}") from None
    if not isinstance(data, dict):
        raise BadMessage("bad_message", "a message must be a JSON object")
    return data


def read_actions(message: bytes | dict, max_samples: int, max_text_chars: int) -> list:
    """What one message (binary audio, or a parsed JSON one) asks of its session: ClientAudio, ClientText and
    ClientPlayback, in the order the session takes them. Raises BadMessage."""
    if isinstance(message, bytes):  # extended protocol: int16 PCM
        if len(message) % 2:
            raise BadMessage("bad_audio", "binary audio must be int16 PCM (an even number of bytes)")
        if len(message) // 2 > max_samples:
            raise BadMessage("audio_too_long", f"more than {max_samples} samples of audio in one message")
        return [ClientAudio(from_pcm16(message))]
    kind = message.get("type")
    if kind is not None and not isinstance(kind, str):
        raise BadMessage("bad_message", "type must be a string")
    actions = []
    if "is_playing" in message:  # CleanS2S's client reports playback as the strings "true"/"false"
        playing = {"true": True, "false": False, True: True, False: False}.get(message["is_playing"]) \
            if isinstance(message["is_playing"], (str, bool)) else None
        if playing is None:
            raise BadMessage("bad_message", 'is_playing must be "true" or "false"')
        actions.append(ClientPlayback(None, playing=playing))
    if kind == "audio_input":
        actions.append(ClientAudio(decode_float32_audio(message.get("audio"), max_samples)))
    elif kind == "user_input":
        actions.append(ClientText(check_text(message.get("text"), max_text_chars)))
    elif kind == "playback":
        actions.append(check_playback(message))
    return actions  # other types (keepalive, ...) ask nothing, as in CleanS2S


def decode_float32_audio(b64: Any, max_samples: int) -> np.ndarray:
    if not isinstance(b64, str):
        raise BadMessage("bad_audio", "audio must be a base64 string")
    if len(b64) > (max_samples * 4 + 2) // 3 * 4:  # refused before decoding: 4 base64 characters per 3 bytes
        raise BadMessage("audio_too_long", f"more than {max_samples} samples of audio in one message")
    raw = from_base64(b64, "bad_audio")
    if len(raw) % 4:
        raise BadMessage("bad_audio", "audio must be float32 PCM (a multiple of 4 bytes)")
    audio = np.frombuffer(raw, "<f4")
    if not np.all(np.isfinite(audio)):
        raise BadMessage("bad_audio", "audio contains NaN or infinity")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def from_base64(b64: str, code: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadMessage(code, f"audio is not valid base64: {exc}") from None


def check_text(text: Any, max_chars: int) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadMessage("bad_text", "user_input needs a non-empty text")
    if len(text) > max_chars:
        raise BadMessage("text_too_long", f"text longer than {max_chars} characters")
    try:  # JSON can escape a lone surrogate (\ud800), which no UTF-8 text, and so no model or log, can hold
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadMessage("bad_text", "text is not valid Unicode (a lone surrogate)") from None
    return text.strip()


def check_playback(data: dict) -> ClientPlayback:
    turn, played, playing = data.get("turn"), data.get("played_ms"), data.get("playing")
    if (not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn < 2**32
            or (played is not None and (isinstance(played, bool) or not isinstance(played, (int, float))
                                        or not 0 <= played < 1e9))
            or (playing is not None and not isinstance(playing, bool))):
        raise BadMessage("bad_playback", "playback needs an integer turn, a played_ms of 0 or more, and a boolean playing")
    return ClientPlayback(turn, played, playing)


async def take(session: Session, actions: list) -> None:
    """Hand a message's actions to its session, in order: what the client said before anything else is heard first."""
    for action in actions:
        if isinstance(action, ClientAudio):
            await session.hear(action.audio)
            continue
        await session.caught_up()
        if isinstance(action, ClientText):
            session.type(action.text)
        else:
            session.played(action.turn, action.played_ms, action.playing)


# Replies on the receiver socket, to every JSON message: CleanS2S's client waits for one.
PLACEHOLDER = json.dumps({"placeholder": ""})
VAD_DETECTED = json.dumps({"return_info": "VAD detected"})  # a user turn started: the client stops its playback
LEGACY_END_PCM = bytes(2 * SAMPLE_RATE // 50)  # 20 ms of silence: carries end_flag to a legacy client


def extended_messages(item: Any) -> list:
    """The extended protocol: events as JSON; each piece of an answer as a JSON "answer" header, then its audio in
    a binary frame that starts with the turn and seq (little-endian uint32 each)."""
    if isinstance(item, ServerEvent):
        return [item.to_json()] if item.extended else []
    header = json.dumps({"event": "answer", "turn": item.turn, "seq": item.seq, "text": item.text, "end": item.last},
                        ensure_ascii=False)
    return [header, struct.pack("<II", item.turn, item.seq) + item.pcm] if item.pcm else [header]


def legacy_messages(item: Any) -> list:
    """CleanS2S's format: no events; a JSON message per piece of the answer. Its client shows question_text and
    answer_text when non-empty, and turns a message without audio into a text bubble, so every one carries audio."""
    if not isinstance(item, AnswerAudio):
        return []
    return [json.dumps({
        "uid": item.session.uid, "user_input_count": item.turn, "question_text": item.question,
        "answer_text": item.text, "answer_audio": base64.b64encode(item.pcm or LEGACY_END_PCM).decode(),
        "end_flag": item.last,
    }, ensure_ascii=False)]


SENTENCE_END = re.compile(r"[.!?。！？…]\s*$")


class LegacyAnswer:
    """One turn's answer cut as CleanS2S's own server cut it, for its client: a message per chunk with the chunk's
    text and all of its audio, end_flag on the last. That client shows each message's text as a bubble whose replay
    button plays that message's audio, and it ends an answer (takes its "still answering" bubble away) only on a
    message with text, audio and end_flag; an end marker of its own would leave that bubble on screen. Only the turn's
    first audio goes out before its chunk is whole, once the chunk has a second piece (its text then rides on the
    rest): a TTS that makes a chunk in one piece (espeak-ng) costs nothing, a streaming one a piece."""

    def __init__(self):
        self._new_turn(-1)

    def _new_turn(self, turn: int) -> None:
        self.turn, self.started = turn, False  # started: the turn's first message went out
        self.pieces, self.text = [], ""  # the chunk under way
        self.waiting: Optional[AnswerAudio] = None  # a whole chunk ending a sentence, which may be the answer's last

    def push(self, item: AnswerAudio) -> list:
        """The messages to send now (AnswerAudio, a chunk each), given the next item from the TTS."""
        if item.turn != self.turn:
            self._new_turn(item.turn)
        out = []
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            if item.last and not item.pcm and not item.text.strip() and not self.pieces:  # the answer ended there
                return [dataclasses.replace(waiting, text=waiting.text + item.text, last=True)]
            out.append(waiting)
        self.text += item.text
        if item.pcm:
            if not self.started and len(self.pieces) == 1:  # the turn's first audio may wait no longer
                out.append(dataclasses.replace(item, text="", pcm=self.pieces.pop(), last=False))
                self.started = True
            self.pieces.append(item.pcm)
            return out
        whole = dataclasses.replace(item, text=self.text, pcm=b"".join(self.pieces))
        self.pieces, self.text = [], ""
        if not whole.text and not whole.pcm and not whole.last:
            return out
        self.started = True
        if not whole.last and SENTENCE_END.search(whole.text):
            self.waiting = whole
        else:
            out.append(whole)
        return out

    def flush(self) -> list:
        """The chunk that waited for the answer's end in vain."""
        waiting, self.waiting = self.waiting, None
        return [waiting] if waiting is not None else []


# ------------------------------------------------------------------------------------------------
# The OpenAI Realtime protocol (its GA version) on /v1/realtime of the receiver port: one socket both ways, JSON
# events, audio as base64 pcm16 at 24 kHz. The same session under it: its hearing and turn-taking, the stages, its
# paced output. docs/realtime.md lists the events it takes and sends, and those it does not.
# ------------------------------------------------------------------------------------------------

REALTIME_PATH = "/v1/realtime"
REALTIME_RATE = 24000  # Hz: the protocol's audio/pcm, its only rate
REALTIME_FORMAT = {"type": "audio/pcm", "rate": REALTIME_RATE}
REALTIME_MAX_ITEMS = 1000  # a conversation keeps this many items; the oldest go first
MIN_COMMIT_MS = 100  # the least audio a commit takes, as the protocol says
# semantic_vad: the longest wait for a turn the model hears unfinished (auto: --max_turn_silence_ms)
SEMANTIC_WAIT_MS = {"low": 4000, "medium": 2000, "auto": None, "high": 1000}


def realtime_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(10)}"


@dataclass
class RealtimeEvent(ServerEvent):  # a Realtime server event the session makes itself (session.updated, item acks, errors)
    extended: ClassVar[bool] = False
    payload: dict


def realtime_error(code: str, message: str, event_id: Optional[str] = None, kind: str = "invalid_request_error") -> dict:
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": None, "event_id": event_id}}


@dataclass
class RealtimeItem:
    """One item of a Realtime conversation: a message (user, assistant or system), a function call, or its output."""
    type: str  # "message", "function_call" or "function_call_output"
    role: str = ""  # a message's: "user", "assistant" or "system"
    text: Optional[str] = None  # a message's text; a spoken one's transcript (None until the ASR has it)
    audio: bool = False  # the message was spoken (input_audio, output_audio)
    turn: Optional[int] = None  # the turn whose words (a user message) it holds
    answer: Optional[Turn] = None  # the turn whose answer (an assistant message) it is: its text is what was heard
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    output: str = ""
    status: str = "completed"
    id: str = field(default_factory=lambda: realtime_id("item"))
    start_ms: int = 0  # a spoken message's place in the input audio
    end_ms: int = 0

    def content(self) -> str:
        return self.answer.heard_text() if self.answer is not None else self.text or ""

    def to_json(self) -> dict:
        item = {"id": self.id, "object": "realtime.item", "type": self.type, "status": self.status}
        if self.type == "function_call":
            return {**item, "call_id": self.call_id, "name": self.name, "arguments": self.arguments}
        if self.type == "function_call_output":
            return {**item, "call_id": self.call_id, "output": self.output}
        side = "output" if self.role == "assistant" else "input"
        part = ({"type": f"{side}_audio", "transcript": self.content() if self.answer or self.text is not None else None}
                if self.audio else {"type": f"{side}_text", "text": self.content()})
        return {**item, "role": self.role, "content": [part]}

    def chat(self) -> Optional[dict]:
        """The item as a chat API message; None for a message with no words (a sound the ASR heard nothing in)."""
        if self.type == "function_call":
            call = {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
            return {"role": "assistant", "content": None, "tool_calls": [call]}
        if self.type == "function_call_output":
            return {"role": "tool", "tool_call_id": self.call_id, "content": self.output}
        text = self.content()
        if self.answer is not None and self.answer.state is TurnState.INTERRUPTED:
            text += INTERRUPTED_MARK
        return {"role": self.role, "content": text} if text else None


class RealtimeConversation:
    """A Realtime conversation's items in order: the client adds, deletes and truncates them; the session adds what the
    user said and its answers. The LLM reads it from its worker thread (messages()): from the last --chat_size user
    messages on, older ones dropped by half that many at once, as ChatHistory does (the prompt's start stays the same
    for several turns, so prompt caches keep serving it)."""

    def __init__(self, max_exchanges: int):
        self.max_exchanges = max_exchanges
        self.items: list = []
        self.lock = threading.Lock()

    def add(self, item: RealtimeItem, after: Optional[str] = "") -> Optional[str]:
        """Insert `item` after the item `after` ("": at the end, None or "root": first); returns the id before it."""
        with self.lock:
            if any(i.id == item.id for i in self.items):
                raise BadMessage("item_already_exists", f"an item with id {item.id} exists")
            at = len(self.items) if after == "" else 0 if after in (None, "root") else self._index(after) + 1
            self.items.insert(at, item)
            if len(self.items) > REALTIME_MAX_ITEMS:
                del self.items[0]
                at -= 1
            return self.items[at - 1].id if at > 0 else None

    def find(self, item_id: Any) -> RealtimeItem:
        with self.lock:
            return self.items[self._index(item_id)]

    def delete(self, item_id: Any) -> None:
        with self.lock:
            del self.items[self._index(item_id)]

    def _index(self, item_id: Any) -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise BadMessage("item_not_found", f"no item with id {str(item_id)[:64]}")

    def last_words(self) -> str:
        with self.lock:
            return next((i.content() for i in reversed(self.items) if i.role == "user" and i.content()), "")

    def before(self, item_id: str) -> Optional[str]:
        """The id of the item before this one; None for the first (or for one no longer there)."""
        with self.lock:
            ids = [i.id for i in self.items]
        return next((a for a, b in zip(ids, ids[1:]) if b == item_id), None)

    def messages(self, instructions: str, answering: Turn, question: str) -> list:
        """Chat messages for answering `answering`: the instructions, every item (a function call joins the assistant
        message before it), then the question, when the turn's words are not in the conversation yet."""
        with self.lock:  # (the words being answered are the question, last)
            items = [item for item in self.items if not (item.role == "user" and item.turn == answering.number)]
        asked = [i for i, item in enumerate(items) if item.role == "user"]
        keep, half = max(1, self.max_exchanges), max(1, self.max_exchanges // 2)
        if len(asked) > keep:  # (from a user message: no function output is left without its call)
            items = items[asked[(len(asked) - keep + half - 1) // half * half]:]
        msgs = [{"role": "system", "content": instructions}] if instructions else []
        for item in items:
            m = item.chat()
            if m is None:
                continue
            if m.get("tool_calls") and msgs and msgs[-1]["role"] == "assistant":
                msgs[-1] = {**msgs[-1], "tool_calls": msgs[-1].get("tool_calls", []) + m["tool_calls"]}
            else:
                msgs.append(m)
        if question:
            msgs.append({"role": "user", "content": question})
        return msgs


class RealtimeSession(Session):
    """A session for an OpenAI Realtime client: the settings it chose (session.update), its conversation, and the
    responses asked of it, by turn detection or by response.create. Turns work as for any session; a turn's answer is
    the response. The protocol has no pause: speech over an answer cuts it off."""

    def __init__(self, pipeline: Pipeline, args: argparse.Namespace, model: str,
                 on_turn_end: Optional[Callable[[Session, Turn, bool], None]] = None):
        args = copy.copy(args)
        args.sample_rate = REALTIME_RATE
        super().__init__(realtime_id("sess"), pipeline, args, on_turn_end=on_turn_end)
        self.can_pause = False
        self.model = model
        self.conversation = RealtimeConversation(args.chat_size)
        self.instructions = args.init_chat_prompt
        self.modalities = ["audio"]
        self.voice_name = "default"
        self.server_args = args
        self.turn_detection: Optional[dict] = {"type": "server_vad", "threshold": args.vad_thresh,
                                               "prefix_padding_ms": args.speech_pad_ms, "silence_duration_ms": args.min_silence_ms,
                                               "create_response": True, "interrupt_response": True}
        if args.turn_detection == "smart_turn":  # as the server's own turn-taking does
            self.turn_detection = {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
        self.extra: dict = {"tool_choice": "auto", "max_output_tokens": "inf"}  # settings echoed as given
        self.buffer: list = []  # audio appended with no turn detection, float32 at 24 kHz, until a commit
        self.heard_ms = 0.0  # input audio appended so far
        self.spoken_items: dict = {}  # turn -> the user message of its speech, from the speech's start
        self.transcribing: dict = {}  # turn in waiting -> (item, Turn): audio the client gave, with the ASR
        self.responses: dict = {}  # turn -> the options of the response.create that started it
        self.deferred: Optional[dict] = None  # a response.create waiting for the transcripts before it
        self.cancelled_by_client: set = set()

    # ---- settings ----

    def settings(self) -> dict:
        audio_in = {"format": REALTIME_FORMAT, "transcription": None, "noise_reduction": None,
                    "turn_detection": self.turn_detection}
        return {"type": "realtime", "object": "realtime.session", "id": self.uid, "model": self.model,
                "output_modalities": self.modalities, "instructions": self.instructions,
                "audio": {"input": audio_in, "output": {"format": REALTIME_FORMAT, "voice": self.voice_name, "speed": 1.0}},
                "tools": [{"type": "function", **t["function"]} for t in self.tools], **self.extra}

    def detect_turns(self, detection: Optional[dict]) -> None:
        """Hear the client's audio with these settings from now on (the utterance under way is dropped)."""
        args = copy.copy(self.server_args)
        if detection is not None:
            semantic = detection["type"] == "semantic_vad"
            args.turn_detection = "smart_turn" if semantic else "silence"
            if semantic:
                args.max_turn_silence_ms = SEMANTIC_WAIT_MS[detection["eagerness"]] or args.max_turn_silence_ms
            else:
                args.vad_thresh = detection["threshold"]
                args.speech_pad_ms, args.min_silence_ms = detection["prefix_padding_ms"], detection["silence_duration_ms"]
            args.enable_interruption = detection["interrupt_response"]
        self.args, self.turn_detection = args, detection
        self.listener = Listener(args, self.pipeline)
        self.buffer.clear()

    def answers(self) -> bool:
        """Whether a turn the server hears ends in a response (turn detection's create_response)."""
        return self.turn_detection is not None and self.turn_detection["create_response"]

    # ---- the client's audio ----

    async def append(self, audio: np.ndarray) -> None:
        """float32 at 24 kHz: heard at once with turn detection, else kept for a commit."""
        self.heard_ms += len(audio) * 1000 / REALTIME_RATE
        if self.turn_detection is not None:
            await self.hear(audio)
            return
        if (sum(map(len, self.buffer)) + len(audio)) * 1000 / REALTIME_RATE > self.args.max_speech_ms:
            raise BadMessage("input_audio_buffer_full", f"more than {self.args.max_speech_ms} ms of audio waits for a commit")
        self.buffer.append(audio)

    def commit(self) -> RealtimeItem:
        """The audio appended so far becomes a user message; the ASR transcribes it."""
        if self.turn_detection is not None:
            raise BadMessage("input_audio_buffer_commit_unsupported",
                             "with turn detection the server commits the audio itself; set turn_detection to null to commit")
        audio, self.buffer = concat(self.buffer), []
        if len(audio) * 1000 / REALTIME_RATE < MIN_COMMIT_MS:
            raise BadMessage("input_audio_buffer_commit_empty", f"buffer too small: at least {MIN_COMMIT_MS} ms of audio is needed, "
                                                                f"it has {len(audio) * 1000 / REALTIME_RATE:.0f} ms")
        item = RealtimeItem("message", "user", audio=True, start_ms=round(self.heard_ms - len(audio) * 1000 / REALTIME_RATE),
                            end_ms=round(self.heard_ms))
        self.conversation.add(item)
        self.transcribe(item, audio)
        return item

    def transcribe(self, item: RealtimeItem, audio: np.ndarray) -> None:
        """A user message the client gave as audio (24 kHz): its transcript becomes its text (see _transcribed). It is
        a turn in waiting of its own, which nothing cuts off."""
        import soxr
        t = Turn(self.waiting_number(), spoken=True, state=TurnState.ANSWERING)
        item.turn = t.number
        self.transcribing[t.number] = (item, t)
        self.pipeline.asr.put(Utterance(self, t.number, soxr.resample(audio, REALTIME_RATE, SAMPLE_RATE).astype(np.float32)))

    def clear_input(self) -> None:
        self.buffer.clear()
        self.listener.forget()

    # ---- responses ----

    def respond(self, options: dict) -> None:
        """response.create: answer from the conversation as it is (after any transcript still with the ASR)."""
        t = self.current()
        if t is not None and t.state in (TurnState.ANSWERING, TurnState.SPEAKING) or self.deferred is not None:
            raise BadMessage("conversation_already_has_active_response", "the conversation already has an active response")
        if self.transcribing:
            self.deferred = options
            return
        t = self.start_turn(spoken=False)
        t.question = self.conversation.last_words()  # what it answers, for the logs and --save_data
        t.times.speech_end = now()
        t.move(TurnState.ANSWERING)
        self.responses[t.number] = options
        self.pipeline.llm.put(UserText(self, t.number, ""))

    def cancel_response(self) -> None:
        t = self.current()
        if self.deferred is not None:
            self.deferred = None
            return
        if t is None or t.state not in (TurnState.ANSWERING, TurnState.SPEAKING, TurnState.FAILED):
            raise BadMessage("response_cancel_not_active", "there is no active response to cancel")
        self.cancelled_by_client.add(t.number)
        t.move(TurnState.INTERRUPTED)
        self.speaker.interrupt(t.number)
        t.cancel()
        self.report_turn(t)

    # ---- the engine, for a Realtime conversation ----

    def prompt(self, turn: Turn, role: str, prompt: str, question: str) -> list:
        instructions = self.responses.get(turn.number, {}).get("instructions") or self.instructions
        return self.conversation.messages(instructions, turn, question)

    def carries_on(self, old: Turn) -> bool:
        return False  # the client keeps the conversation: each utterance is an item of its own

    def speaks(self, turn: int) -> bool:
        return "audio" in self.responses.get(turn, {}).get("output_modalities", self.modalities)

    def vad_at_ms(self) -> float:
        """Where in the input audio the VAD is: all appended, less what still waits to be heard."""
        return self.heard_ms - self.listener.unheard_ms()

    def start_spoken_turn(self, heard_at: Optional[float]) -> Turn:
        t = super().start_spoken_turn(heard_at)
        vad = self.listener.vad
        start_ms = self.vad_at_ms() - len(vad.windows) * vad.window_ms
        self.spoken_items = {n: i for n, i in self.spoken_items.items() if n >= t.number - 1}
        self.spoken_items[t.number] = RealtimeItem("message", "user", audio=True, turn=t.number, status="in_progress",
                                                   start_ms=max(0, round(start_ms)))
        return t

    def speech_ended(self, t: Turn) -> None:
        item = self.spoken_items.get(t.number)
        if item is not None:
            item.status, item.end_ms = "completed", round(self.vad_at_ms() - t.times.eot_wait_ms + (t.times.turn_model_ms or 0))
            self.conversation.add(item)
        super().speech_ended(t)
        if item is not None and not self.answers():  # create_response off: the words join the conversation, no more
            self.transcribing[t.number] = (item, t)
            t.move(TurnState.SENT)

    def wants(self, turn: int) -> bool:
        return super().wants(turn) or (not self.closed and turn in self.transcribing)

    def turn_record(self, number: int) -> Turn:
        held = self.transcribing.get(number)
        return held[1] if held is not None else super().turn_record(number)

    def transcribed(self, text: UserText) -> None:
        if text.turn in self.transcribing:
            self._call_from_thread(self._transcribed, text)
        else:
            super().transcribed(text)

    def fail_turn(self, turn: int, code: str, message: str) -> None:
        if turn in self.transcribing:  # the client's audio message keeps no words; the session goes on
            self.send_event(ErrorEvent(code, message))
            self._call_from_thread(self._transcribed, UserText(self, turn, ""))
        else:
            super().fail_turn(turn, code, message)

    def _transcribed(self, text: UserText) -> None:
        held = self.transcribing.pop(text.turn, None)
        if held is None:
            return
        item = held[0]
        item.text = text.text
        if self.spoken_items.get(text.turn) is not item:  # (a spoken turn's transcript goes out as any turn's does)
            self.speaker.put(RealtimeEvent(transcript_completed(item)))
            self.speaker.put(RealtimeEvent({"type": "conversation.item.done", "item": item.to_json()}))
        if not self.transcribing and self.deferred is not None:
            options, self.deferred = self.deferred, None
            self.respond(options)


def transcript_completed(item: RealtimeItem) -> dict:
    return {"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id, "content_index": 0,
            "transcript": item.text or "", "usage": {"type": "duration", "seconds": round((item.end_ms - item.start_ms) / 1000, 3)}}


@dataclass
class RealtimeResponse:
    """One response as it goes out: an assistant message (its audio and transcript, or its text), and a function
    call item per call the model makes."""
    id: str
    turn: int
    modalities: list
    metadata: Any = None
    output: list = field(default_factory=list)  # RealtimeItems, in order
    message: Optional[RealtimeItem] = None
    calls: dict = field(default_factory=dict)  # the call's index in the answer -> its item
    resampler: Any = None  # the answer's audio, 16 -> 24 kHz
    error: Optional[dict] = None

    def json(self, status: str, details: Optional[dict] = None, usage: Optional[dict] = None) -> dict:
        if usage:  # the LLM's token counts (the protocol's usage counts a speech model's tokens, audio included)
            usage = {**usage, "total_tokens": usage["input_tokens"] + usage["output_tokens"]}
        return {"object": "realtime.response", "id": self.id, "status": status, "status_details": details,
                "output": [item.to_json() for item in self.output], "conversation_id": None,
                "output_modalities": self.modalities, "metadata": self.metadata, "usage": usage or None,
                "audio": {"output": {"format": REALTIME_FORMAT}}}


class RealtimeOutput:
    """A RealtimeSession's output (Session.output) as Realtime server events, in order: speech started and stopped,
    the user's message and its transcript, and each answer as a response."""

    def __init__(self, session: RealtimeSession):
        self.session = session
        self.responses: dict = {}  # turn -> its RealtimeResponse, while it goes out
        self.done: deque = deque(maxlen=64)  # turns whose response is done

    def messages(self, item: Any) -> list:
        events = self.events(item)
        return [json.dumps({"event_id": realtime_id("event"), **e}, ensure_ascii=False) for e in events]

    def events(self, item: Any) -> list:
        s = self.session
        if isinstance(item, RealtimeEvent):
            return [item.payload]
        if isinstance(item, AnswerAudio):
            return self.answer(item)
        if isinstance(item, ToolCallEvent):
            return self.tool_call(item)
        if isinstance(item, MetricsEvent):
            return self.finish(item.turn, item.metrics)
        if isinstance(item, ErrorEvent):
            if item.turn is not None and item.turn in self.responses:
                self.responses[item.turn].error = {"type": "server_error", "code": item.code, "message": item.message}
                return []
            return [realtime_error(item.code, item.message, kind="server_error" if item.turn is not None else "invalid_request_error")]
        spoken = s.spoken_items.get(getattr(item, "turn", None))
        if spoken is None:
            return []
        if isinstance(item, SpeechStartEvent):
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": spoken.start_ms, "item_id": spoken.id}]
        if isinstance(item, SpeechEndEvent):
            before = s.conversation.before(spoken.id)
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": spoken.end_ms, "item_id": spoken.id},
                    {"type": "input_audio_buffer.committed", "item_id": spoken.id, "previous_item_id": before},
                    {"type": "conversation.item.added", "item": spoken.to_json(), "previous_item_id": before}]
        if isinstance(item, TranscriptEvent):
            if not item.final:
                return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": spoken.id, "content_index": 0,
                         "delta": item.text}]
            spoken.text = item.text
            return [transcript_completed(spoken), {"type": "conversation.item.done", "item": spoken.to_json()}]
        return []

    def response(self, turn: int, events: list) -> Optional[RealtimeResponse]:
        """The turn's response, started (response.created) at its first output; None once it is done."""
        if turn in self.done:
            return None
        r = self.responses.get(turn)
        if r is None:
            options = self.session.responses.get(turn, {})
            r = RealtimeResponse(realtime_id("resp"), turn, options.get("output_modalities", self.session.modalities),
                                 options.get("metadata"))
            self.responses[turn] = r
            events.append({"type": "response.created", "response": r.json("in_progress")})
        return r

    def add_output(self, r: RealtimeResponse, item: RealtimeItem, events: list) -> None:
        before = self.session.conversation.add(item)
        r.output.append(item)
        events += [{"type": "response.output_item.added", "response_id": r.id, "output_index": len(r.output) - 1,
                    "item": item.to_json()},
                   {"type": "conversation.item.added", "item": item.to_json(), "previous_item_id": before}]

    def answer(self, item: AnswerAudio) -> list:
        events: list = []
        r = self.response(item.turn, events)
        if r is None or not (item.text or item.pcm):
            return events
        audio = "audio" in r.modalities
        if r.message is None:
            r.message = RealtimeItem("message", "assistant", audio=audio, answer=self.session.turns.get(item.turn),
                                     status="in_progress")
            self.add_output(r, r.message, events)
            part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
            events.append({"type": "response.content_part.added", **self.place(r), "part": part})
        if item.text:
            kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
            events.append({"type": kind, **self.place(r), "delta": item.text})
        if item.pcm:
            if r.resampler is None:
                import soxr
                r.resampler = soxr.ResampleStream(SAMPLE_RATE, REALTIME_RATE, 1, dtype="int16")
            pcm = r.resampler.resample_chunk(np.frombuffer(item.pcm, "<i2")).astype("<i2").tobytes()
            events.append({"type": "response.output_audio.delta", **self.place(r), "delta": base64.b64encode(pcm).decode()})
        return events

    def place(self, r: RealtimeResponse) -> dict:
        return {"response_id": r.id, "item_id": r.message.id, "output_index": r.output.index(r.message), "content_index": 0}

    def tool_call(self, ev: ToolCallEvent) -> list:
        events: list = []
        r = self.response(ev.turn, events)
        if r is None:
            return events
        call = r.calls.get(ev.index)
        if call is None:
            call = r.calls[ev.index] = RealtimeItem("function_call", call_id=ev.call_id, name=ev.name, status="in_progress")
            self.add_output(r, call, events)
        place = {"response_id": r.id, "item_id": call.id, "output_index": r.output.index(call), "call_id": call.call_id}
        if not ev.done:
            call.arguments += ev.arguments
            return events + [{"type": "response.function_call_arguments.delta", **place, "delta": ev.arguments}]
        call.name, call.arguments, call.status = ev.name, ev.arguments, "completed"
        return events + [{"type": "response.function_call_arguments.done", **place, "name": call.name, "arguments": call.arguments},
                         {"type": "response.output_item.done", "response_id": r.id, "output_index": place["output_index"],
                          "item": call.to_json()},
                         {"type": "conversation.item.done", "item": call.to_json()}]

    def finish(self, turn: int, metrics: dict) -> list:
        """The turn is over: its response is done, completed, cancelled or failed."""
        events: list = []
        r = self.response(turn, events)
        if r is None:
            return events
        del self.responses[turn]
        self.done.append(turn)
        self.session.responses.pop(turn, None)
        if metrics["interrupted"]:
            reason = "client_cancelled" if turn in self.session.cancelled_by_client else "turn_detected"
            self.session.cancelled_by_client.discard(turn)
            status, details = "cancelled", {"type": "cancelled", "reason": reason}
        elif r.error is not None:
            status, details = "failed", {"type": "failed", "error": r.error}
        else:
            status, details = "completed", None
        m = r.message
        if m is not None:
            m.status = "completed" if status == "completed" else "incomplete"
            place, text = self.place(r), m.content()
            if m.audio and r.resampler is not None and status != "cancelled":  # what the resampler still holds
                rest = r.resampler.resample_chunk(np.zeros(0, np.int16), last=True).astype("<i2").tobytes()
                events.append({"type": "response.output_audio.delta", **place, "delta": base64.b64encode(rest).decode()})
            if m.audio:
                events += [{"type": "response.output_audio.done", **place},
                           {"type": "response.output_audio_transcript.done", **place, "transcript": text}]
                part = {"type": "audio", "transcript": text}
            else:
                events.append({"type": "response.output_text.done", **place, "text": text})
                part = {"type": "text", "text": text}
            events += [{"type": "response.content_part.done", **place, "part": part},
                       {"type": "response.output_item.done", "response_id": r.id, "output_index": place["output_index"],
                        "item": m.to_json()},
                       {"type": "conversation.item.done", "item": m.to_json()}]
        t = self.session.turns.get(turn)
        return events + [{"type": "response.done", "response": r.json(status, details, t.usage if t is not None else None)}]


class SessionUpdate:
    """A session.update's settings, each checked against what this server serves. They take effect all together, or,
    when one is refused (BadMessage), none do: the session keeps what it had."""

    KEYS = {"type", "instructions", "output_modalities", "audio", "tools", "tool_choice", "max_output_tokens",
            "tracing", "truncation", "prompt", "include", "model"}

    def __init__(self, session: RealtimeSession, max_text_chars: int):
        self.session, self.max_text_chars = session, max_text_chars

    def apply(self, new: Any) -> None:
        s = self.session
        if not isinstance(new, dict):
            raise BadMessage("invalid_value", "session.update needs a session object")
        unknown = set(new) - self.KEYS
        if unknown:
            raise BadMessage("unknown_parameter", f"unknown or unsupported session settings: {', '.join(sorted(unknown))}")
        if new.get("type", "realtime") != "realtime":
            raise BadMessage("invalid_value", "only realtime sessions are served here (not transcription)")
        audio_in, audio_out = self.audio(new.get("audio") or {})
        instructions = new.get("instructions", s.instructions)
        if not isinstance(instructions, str) or len(instructions) > 16 * self.max_text_chars:
            raise BadMessage("invalid_value", "instructions must be a string of at most "
                                              f"{16 * self.max_text_chars} characters")
        modalities = self.modalities(new.get("output_modalities", s.modalities))
        voice = self.voice(audio_out.get("voice"))
        tools = self.tools(new["tools"]) if "tools" in new else s.tools
        if tools and not s.pipeline.llm.handler.takes_tools:
            raise BadMessage("invalid_value", "tools need an LLM that calls functions (--llm openai)")
        tool_choice = self.tool_choice(new.get("tool_choice", s.extra["tool_choice"]))
        detection = self.turn_detection(audio_in["turn_detection"]) if "turn_detection" in audio_in else s.turn_detection
        limit = new.get("max_output_tokens", s.extra["max_output_tokens"])
        if limit != "inf" and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 4096):
            raise BadMessage("invalid_value", 'max_output_tokens must be 1 to 4096, or "inf"')
        s.instructions, s.modalities, s.tools = instructions, modalities, tools
        s.extra["tool_choice"], s.tool_choice = tool_choice, self.chat_tool_choice(tool_choice)
        s.extra["max_output_tokens"] = limit
        if voice is not None:
            s.voice_name, s.voice = voice
        if detection != s.turn_detection:
            s.detect_turns(detection)

    @staticmethod
    def audio(audio: Any) -> tuple:
        """(audio.input, audio.output), checked: the one format served."""
        audio_in, audio_out = (audio.get("input") or {}, audio.get("output") or {}) if isinstance(audio, dict) else (None, None)
        if not isinstance(audio_in, dict) or not isinstance(audio_out, dict):
            raise BadMessage("invalid_value", "audio, audio.input and audio.output must be objects")
        for fmt in (audio_in.get("format"), audio_out.get("format")):
            served = isinstance(fmt, dict) and fmt.get("type") == "audio/pcm" and fmt.get("rate", REALTIME_RATE) == REALTIME_RATE
            if fmt is not None and not served:
                raise BadMessage("invalid_value", "the only audio format served is {'type': 'audio/pcm', 'rate': 24000}")
        return audio_in, audio_out

    @staticmethod
    def modalities(value: Any) -> list:
        if value not in (["audio"], ["text"]):
            raise BadMessage("invalid_value", 'output_modalities must be ["audio"] or ["text"]')
        return list(value)

    def voice(self, value: Any) -> Optional[tuple]:
        """(name, the TTS's voice) for a voice the client names, None when it names none."""
        name = value.get("id") if isinstance(value, dict) else value
        if name is None:
            return None
        if not isinstance(name, str) or not name:
            raise BadMessage("invalid_value", "voice must be a voice's name")
        tts = self.session.pipeline.tts.handler
        voice = tts.voice_named(name)
        if voice is None and tts.voice_names():
            raise BadMessage("invalid_value", f"no voice {name[:64]}; this server has: {', '.join(tts.voice_names())}")
        return name, voice  # a TTS with one voice speaks with it, whatever the name

    @staticmethod
    def tools(value: Any) -> list:
        """Realtime function tools in the chat API's form."""
        if not isinstance(value, list) or len(value) > 128:
            raise BadMessage("invalid_value", "tools must be a list of at most 128 functions")
        tools = []
        for tool in value:
            if (not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("name"), str)
                    or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool["name"])):
                raise BadMessage("invalid_value", "each tool must be a function with a name of 1-64 letters, digits, _ or -")
            tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}})
        return tools

    @staticmethod
    def tool_choice(value: Any) -> Any:
        if value in ("auto", "none", "required") or (isinstance(value, dict) and value.get("type") == "function"
                                                     and isinstance(value.get("name"), str)):
            return value
        raise BadMessage("invalid_value", 'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}')

    @staticmethod
    def chat_tool_choice(value: Any) -> Any:
        return {"type": "function", "function": {"name": value["name"]}} if isinstance(value, dict) else value

    def turn_detection(self, value: Any) -> Optional[dict]:
        if value is None:
            return None
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in ("server_vad", "semantic_vad"):
            raise BadMessage("invalid_value", "turn_detection must be null, server_vad or semantic_vad")
        if kind == "semantic_vad" and self.session.pipeline.turn_model is None:
            raise BadMessage("invalid_value", "semantic_vad needs the turn model: start the server with --turn_detection smart_turn")
        current = self.session.turn_detection or {}
        merged = {"type": kind, "create_response": True, "interrupt_response": True}
        if kind == "server_vad":
            merged.update(threshold=current.get("threshold", self.session.args.vad_thresh),
                          prefix_padding_ms=current.get("prefix_padding_ms", self.session.args.speech_pad_ms),
                          silence_duration_ms=current.get("silence_duration_ms", self.session.args.min_silence_ms))
        else:
            merged["eagerness"] = "auto"
        for key, given in value.items():
            if key == "type" or given is None:
                continue
            if key not in merged:
                raise BadMessage("unknown_parameter", f"turn_detection.{key[:64]} is not supported")
            ok = {"threshold": lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
                  "prefix_padding_ms": lambda v: isinstance(v, int) and 0 <= v <= 2000,
                  "silence_duration_ms": lambda v: isinstance(v, int) and 100 <= v <= 10000,
                  "eagerness": lambda v: v in SEMANTIC_WAIT_MS}.get(key, lambda v: isinstance(v, bool))
            if isinstance(given, bool) != (key in ("create_response", "interrupt_response")) or not ok(given):
                raise BadMessage("invalid_value", f"turn_detection.{key} is out of range")
            merged[key] = given
        return merged


class RealtimeClient:
    """What an OpenAI Realtime client's events ask of its session, checked: each is carried out, or answered with an
    `error` event that names it, and the session goes on."""

    RESPONSE_KEYS = {"instructions", "output_modalities", "metadata", "conversation"}

    def __init__(self, session: RealtimeSession, max_text_chars: int, pace: Callable[[int], Any]):
        self.session, self.max_text_chars = session, max_text_chars
        self.pace = pace  # awaited with the samples of each append before they are heard: the real-time limit
        self.handlers = {
            "session.update": self.session_update, "input_audio_buffer.append": self.append,
            "input_audio_buffer.commit": self.commit, "input_audio_buffer.clear": self.clear,
            "conversation.item.create": self.item_create, "conversation.item.truncate": self.item_truncate,
            "conversation.item.delete": self.item_delete, "conversation.item.retrieve": self.item_retrieve,
            "response.create": self.response_create, "response.cancel": self.response_cancel,
        }

    def send(self, payload: dict) -> None:
        self.session.speaker.put(RealtimeEvent(payload))

    def opened(self) -> None:
        self.send({"type": "session.created", "session": self.session.settings()})

    async def take(self, message: Any) -> None:
        """Carry out one client event. A bad one is answered with an error event (and raises BadMessage, for the log)."""
        event: dict = {}
        try:
            if isinstance(message, bytes):
                raise BadMessage("invalid_event", "events are JSON text; audio goes in input_audio_buffer.append")
            event = parse_json(message)
            handler = self.handlers.get(event.get("type")) if isinstance(event.get("type"), str) else None
            if handler is None:
                raise BadMessage("invalid_event", f"unknown or unsupported event type: {str(event.get('type'))[:64]}")
            if event["type"] != "input_audio_buffer.append":
                await self.session.caught_up()  # the audio appended before this event is heard first
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        except BadMessage as exc:
            event_id = event.get("event_id")
            self.send(realtime_error(exc.code, str(exc), event_id if isinstance(event_id, str) else None))
            raise

    def session_update(self, event: dict) -> None:
        SessionUpdate(self.session, self.max_text_chars).apply(event.get("session"))
        self.send({"type": "session.updated", "session": self.session.settings()})

    # ---- input audio ----

    async def append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise BadMessage("invalid_value", "audio must be base64 pcm16")
        samples = decode_pcm16(audio)
        await self.pace(len(samples))
        await self.session.append(samples)

    def commit(self, event: dict) -> None:
        item = self.session.commit()
        before = self.session.conversation.before(item.id)
        self.send({"type": "input_audio_buffer.committed", "item_id": item.id, "previous_item_id": before})
        self.send({"type": "conversation.item.added", "item": item.to_json(), "previous_item_id": before})

    def clear(self, event: dict) -> None:
        self.session.clear_input()
        self.send({"type": "input_audio_buffer.cleared"})

    # ---- the conversation ----

    async def item_create(self, event: dict) -> None:
        item, audio = self.item(event.get("item"))
        if audio is not None:
            await self.pace(len(audio))  # the ASR hears it: within the real-time limit, as appended audio
        before = self.session.conversation.add(item, event.get("previous_item_id") or "")
        self.send({"type": "conversation.item.added", "item": item.to_json(), "previous_item_id": before})
        if audio is None:
            self.send({"type": "conversation.item.done", "item": item.to_json(), "previous_item_id": before})
        else:
            self.session.transcribe(item, audio)

    def item(self, value: Any) -> tuple:
        """A client's item, and its audio (24 kHz) when it is a spoken message."""
        if not isinstance(value, dict):
            raise BadMessage("invalid_value", "conversation.item.create needs an item")
        kind, given_id = value.get("type"), value.get("id")
        extra = {"id": given_id} if isinstance(given_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", given_id) else {}
        if kind == "function_call_output":
            if not isinstance(value.get("call_id"), str) or not isinstance(value.get("output"), str):
                raise BadMessage("invalid_value", "a function_call_output needs a call_id and an output string")
            return RealtimeItem("function_call_output", call_id=value["call_id"], output=self.text(value["output"]), **extra), None
        if kind == "function_call":
            if not all(isinstance(value.get(k), str) for k in ("call_id", "name", "arguments")):
                raise BadMessage("invalid_value", "a function_call needs call_id, name and arguments strings")
            return RealtimeItem("function_call", call_id=value["call_id"], name=value["name"][:64],
                                arguments=self.text(value["arguments"]), **extra), None
        role, content = value.get("role"), value.get("content")
        if kind != "message" or role not in ("user", "assistant", "system") or not isinstance(content, list) or len(content) != 1:
            raise BadMessage("invalid_value", "an item must be a message (user, assistant or system, with one content part), "
                                              "a function_call or a function_call_output")
        part = content[0] if isinstance(content[0], dict) else {}
        if part.get("type") == "input_audio" and role == "user":
            if not isinstance(part.get("audio"), str):
                raise BadMessage("invalid_value", "input_audio needs base64 pcm16 audio")
            audio = decode_pcm16(part["audio"])
            if not MIN_COMMIT_MS <= len(audio) * 1000 / REALTIME_RATE <= self.session.args.max_speech_ms:
                raise BadMessage("invalid_value", f"input_audio must hold {MIN_COMMIT_MS} to {self.session.args.max_speech_ms} ms")
            return RealtimeItem("message", "user", audio=True, end_ms=round(len(audio) * 1000 / REALTIME_RATE), **extra), audio
        if part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise BadMessage("invalid_value", "a message's content must be input_text (output_text for the assistant) "
                                              "or, for the user, input_audio")
        return RealtimeItem("message", role, text=self.text(part["text"]), **extra), None

    def text(self, value: str) -> str:
        if len(value) > self.max_text_chars:
            raise BadMessage("text_too_long", f"text longer than {self.max_text_chars} characters")
        return check_text(value, self.max_text_chars) if value.strip() else value

    def item_truncate(self, event: dict) -> None:
        item = self.session.conversation.find(event.get("item_id"))
        end_ms = event.get("audio_end_ms")
        if item.answer is None or not item.audio:
            raise BadMessage("invalid_value", "only an assistant's audio message can be truncated")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or not 0 <= end_ms <= item.answer.audio_sent_ms + 1:
            raise BadMessage("invalid_value", f"audio_end_ms must be 0 to the audio's length ({item.answer.audio_sent_ms:.0f} ms)")
        item.answer.played_ms = end_ms
        self.send({"type": "conversation.item.truncated", "item_id": item.id, "content_index": 0, "audio_end_ms": end_ms})

    def item_delete(self, event: dict) -> None:
        self.session.conversation.delete(event.get("item_id"))
        self.send({"type": "conversation.item.deleted", "item_id": event["item_id"]})

    def item_retrieve(self, event: dict) -> None:
        item = self.session.conversation.find(event.get("item_id"))
        self.send({"type": "conversation.item.retrieved", "item": item.to_json()})

    # ---- responses ----

    def response_create(self, event: dict) -> None:
        options = event.get("response") or {}
        if not isinstance(options, dict) or set(options) - self.RESPONSE_KEYS:
            raise BadMessage("unknown_parameter", 'response.create takes instructions, output_modalities, metadata and '
                                                  'conversation "auto"')
        if options.get("conversation", "auto") != "auto":
            raise BadMessage("invalid_value", 'only conversation "auto" is served (no out-of-band responses)')
        if "output_modalities" in options:
            SessionUpdate.modalities(options["output_modalities"])
        if not isinstance(options.get("instructions", ""), str):
            raise BadMessage("invalid_value", "instructions must be a string")
        self.session.respond(options)

    def response_cancel(self, event: dict) -> None:
        self.session.cancel_response()


def decode_pcm16(b64: str) -> np.ndarray:
    """base64 int16 little-endian PCM -> float32 in [-1, 1]."""
    raw = from_base64(b64, "invalid_value")
    if len(raw) % 2:
        raise BadMessage("invalid_value", "audio must be pcm16 (an even number of bytes)")
    return from_pcm16(raw)


# ------------------------------------------------------------------------------------------------
# The network shell: sockets, admission, limits, TLS, the static client, saved turns and operations. Nothing
# here knows a model; a fork that swaps one need not read on.
# ------------------------------------------------------------------------------------------------

def add_network_args(p: argparse.ArgumentParser) -> None:
    """The network shell's flags: where it listens, who may connect, what one client may cost, what it keeps."""
    add_listening_args(p)
    add_security_args(p)
    add_limit_args(p)
    add_data_args(p)


def add_listening_args(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("network")
    net.add_argument("--recv_host", default="localhost", help="host of the receiver socket (client -> server); 0.0.0.0 to accept other machines")
    net.add_argument("--recv_port", type=int, default=9001, help="port of the receiver socket")
    net.add_argument("--send_host", default="localhost", help="host of the sender socket (server -> client)")
    net.add_argument("--send_port", type=int, default=9002, help="port of the sender socket")
    net.add_argument("--max_sessions", type=int, default=16, help="clients served at once; the next one is refused with close code 1013")
    net.add_argument("--client_dir", default="auto",
                     help="built browser client to serve over HTTP on the receiver port (open http://RECV_HOST:RECV_PORT/); "
                          "auto: frontend_nextjs/out beside this file when it is built; '' serves none")
    net.add_argument("--public_receiver_url", default=None,
                     help="where clients reach the receiver socket when a proxy (nginx) stands in front: ws[s]://HOST[:PORT][/PATH], "
                          "or :PORT for that port on the page's own host. The page learns it from /s2s-config.json. "
                          "Default: --recv_port on the page's host")
    net.add_argument("--public_sender_url", default=None,
                     help="where clients reach the sender socket when a proxy stands in front; as --public_receiver_url. "
                          "Default: --send_port on the page's host")


def add_security_args(p: argparse.ArgumentParser) -> None:
    sec = p.add_argument_group("security")
    sec.add_argument("--auth_token", default=None,
                     help="shared secret every socket requires (query ?token=, WebSocket subprotocol s2s.token.TOKEN, or the header "
                          "Authorization: Bearer TOKEN, as OpenAI Realtime clients send their key); "
                          "default: the S2S_AUTH_TOKEN environment variable (preferred: a flag shows in the process list), else none")
    sec.add_argument("--allowed_origins", default="auto",
                     help="browser pages that may connect, comma-separated (https://app.example.com,http://localhost:3000); "
                          "auto: pages from the server's own host name, and clients that send no Origin; * allows any")
    sec.add_argument("--trusted_proxies", default="127.0.0.1,::1",
                     help="addresses of reverse proxies (nginx) whose X-Forwarded-For header names the client, comma-separated; "
                          "the logs show that client instead of the proxy. Empty: trust none")
    sec.add_argument("--ssl_certfile", default=None, help="TLS certificate (PEM): serves wss:// and the browser client over https")
    sec.add_argument("--ssl_keyfile", default=None, help="TLS private key (PEM) of --ssl_certfile")
    sec.add_argument("--legacy_clients", choices=["auto", "allow", "refuse"], default="auto",
                     help="CleanS2S's own client (no uid in its URLs; it hears every legacy session's answers and keeps its own): "
                          "auto allows it only with no --auth_token and both sockets on localhost; refused ones get code 4426")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("limits")
    limits.add_argument("--max_message_kb", type=int, default=512, help="largest WebSocket message in KiB; a larger one closes the connection (code 1009)")
    limits.add_argument("--max_audio_ms_per_message", type=int, default=1000, help="most audio in one message; longer audio is refused (error audio_too_long)")
    limits.add_argument("--max_text_chars", type=int, default=2000, help="longest typed text; longer is refused (error text_too_long). A question carried on across pauses (--continue_turn_ms) keeps its last this many")
    limits.add_argument("--max_messages_per_s", type=int, default=100,
                        help="messages per second per connection (a microphone sends about 31); past it, the server reads the rest at "
                             "that rate (error rate_limited)")
    limits.add_argument("--max_audio_ahead_s", type=float, default=5.0,
                        help="audio a session may send ahead of real time (what a client held back while it reconnected); past it, "
                             "the server hears the rest in real time (error audio_too_fast): no client makes it hear faster than a "
                             "person talks")
    limits.add_argument("--idle_timeout_s", type=float, default=300.0,
                        help="close a receiver connection that sends nothing for this long, and a legacy sender that has no legacy "
                             "session from its address for this long (code 4408); 0 never does")
    limits.add_argument("--resume_s", type=float, default=30.0,
                        help="keep a session this long after its receiver closes, so the client can come back to it with its session "
                             "key; a new session that needs the slot ends it sooner")
    limits.add_argument("--max_connections_per_client", type=int, default=8,
                        help="open connections from one client address (the forwarded one behind --trusted_proxies); the next is refused "
                             "with 1013. Clients on the machine itself (loopback, an SSH tunnel) are not limited")
    limits.add_argument("--max_pending_connections", type=int, default=512,
                        help="connections still in their opening handshake, in all; past it (or past 16 from one address) the one "
                             "waiting longest is dropped, so slow handshakes cannot keep a new client out")
    limits.add_argument("--send_timeout_s", type=float, default=10.0,
                        help="close a connection (code 4429) whose client has not taken a message within this many seconds")
    limits.add_argument("--send_buffer_kb", type=int, default=4096,
                        help="close a connection (code 4429) that has more than this many KiB waiting to be sent to its client")
    limits.add_argument("--ping_interval_s", type=float, default=20.0, help="WebSocket keep-alive ping every this many seconds")
    limits.add_argument("--ping_timeout_s", type=float, default=20.0, help="close a connection whose ping is not answered within this")


def add_data_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--save_data", nargs="?", const="s2s_data", default=None, metavar="DIR",
                      help="store every turn (input wav, transcript, answer text, answer wav) in DIR, a folder per session; bare flag: s2s_data")
    data.add_argument("--save_data_max_mb", type=float, default=1024,
                      help="stop saving (one warning in the log) once DIR holds this many MiB; 0: no limit")
    data.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    data.add_argument("--log_format", choices=["text", "json"], default="text",
                      help="json: one JSON object per line (time, level, logger, message, and a turn line's figures as fields)")

    ops = p.add_argument_group("operations")
    ops.add_argument("--ops_port", type=int, default=0,
                     help="also serve /metrics (Prometheus) and /healthz on this port of --recv_host, from before the models load, "
                          "so /healthz says 503 until they are ready; 0: only on the receiver port, which listens once they are")


def taken_port(args: argparse.Namespace) -> Optional[str]:
    """Why the receiver or sender cannot listen, or None: checked before the models load (minutes for some), as a
    server already running on the port is the usual reason."""
    for flag, host, port in (("--recv_port", args.recv_host, args.recv_port), ("--send_port", args.send_host, args.send_port)):
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own sockets do
                try:
                    probe.bind(address)
                except OSError as exc:
                    return f"{flag} {port}: cannot listen on {address[0]}: {exc.strerror} (is another server running?)"
    return None


class VoiceAgentServer:
    """Both sockets: the receiver, where a client's messages go to its session, and the sender, where it hears it."""

    def __init__(self, args: argparse.Namespace, pipeline: Pipeline, ops: Optional[OpsEndpoints] = None):
        self.args, self.pipeline = args, pipeline
        self.ops = ops or OpsEndpoints(args.auth_token)  # main() makes it before the models load, for --ops_port
        self.metrics = self.ops.metrics
        self.log = LogLimiter()
        self.recorder = TurnRecorder(args.save_data, args.save_data_max_mb * 2**20, self.log) if args.save_data else None
        self.sessions = SessionRegistry(self)
        self.admission = Admission(self)
        self.legacy_allowed = legacy_clients_allowed(args)
        self.receiver, self.sender = ReceiverSocket(self), SenderSocket(self)
        self.realtime = RealtimeSocket(self)
        self.stopped: asyncio.Event = None

    async def run(self, ready: Optional[Callable[[], None]] = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.on_loop_error)
        self.stopped = asyncio.Event()
        self.pipeline.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopped.set)
        async with self.serve(), LoopWatch(self.metrics).watching():
            self.ops.live = self.pipeline.running
            if ready:
                ready()
            await self.stopped.wait()
            self.ops.live = None  # /healthz: 503 while shutting down
            logger.info("shutting down: closing %d connections", len(self.admission.connections))
            await asyncio.gather(*(close_within(ws, 1001, "server shutting down") for ws in list(self.admission.connections)))
        for link in self.sessions.all():
            self.sessions.end(link)
        await asyncio.to_thread(self.pipeline.stop)
        if self.recorder:  # every turn record queued so far is written before the process exits
            await asyncio.to_thread(self.recorder.close)

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[None]:
        """Both sockets listen, and the built client is served on the receiver port, while this is entered."""
        a = self.args
        files = ClientFiles(a.client_dir, page_config(a)) if a.client_dir else None
        tls = None
        if a.ssl_certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(a.ssl_certfile, a.ssl_keyfile)
        def dropped(peer: str) -> None:
            self.log.warning("handshakes", f"dropped a connection from {peer}: too many opening handshakes in progress")
            self.metrics.handshakes_dropped.inc()
        gate = HandshakeGate(a.max_pending_connections, self.admission.trusted_proxies, dropped)

        async def receiver_request(ws: ServerConnection, request: Any) -> Any:
            return (bad_request(ws, request) or self.ops.response(request.path, request.headers)
                    or (await files.process_request(ws, request) if files else None))

        # close_timeout: a refused client whose messages we no longer read cannot answer our close (the library
        # stops reading the socket when its queue is full), so the close ends after 2 s, not websockets' 10.
        # compression=None: PCM does not compress, and permessage-deflate would let a 500-byte frame inflate to the
        # whole --max_message_kb, a thousandfold, before any limit applies.
        common = dict(ssl=tls, max_size=a.max_message_kb * 1024, ping_interval=a.ping_interval_s or None,
                      ping_timeout=a.ping_timeout_s or None, close_timeout=2, compression=None,
                      select_subprotocol=AccessPolicy.select_subprotocol, create_connection=functools.partial(GatedConnection, gate))
        async with serve(self.on_receiver_port, a.recv_host, a.recv_port, **common, process_request=receiver_request), \
                serve(self.sender.handle, a.send_host, a.send_port, **common, process_request=bad_request):
            ws_scheme, http_scheme = ("wss", "https") if tls else ("ws", "http")
            if files:
                logger.info("browser client: %s://%s:%d/ (from %s)", http_scheme, a.recv_host, a.recv_port, a.client_dir)
            if a.public_receiver_url or a.public_sender_url:
                logger.info("pages are told the sockets are at receiver %s, sender %s", a.public_receiver_url or a.recv_port,
                            a.public_sender_url or a.send_port)
            logger.info("ready: receiver %s://%s:%d  sender %s://%s:%d%s%s", ws_scheme, a.recv_host, a.recv_port,
                        ws_scheme, a.send_host, a.send_port, " (token required)" if a.auth_token else "",
                        "" if self.legacy_allowed else " (legacy clients refused)")
            yield

    async def on_receiver_port(self, ws: ServerConnection) -> None:
        """An OpenAI Realtime client on /v1/realtime; any other socket on the receiver port is a receiver."""
        realtime = urlparse(ws.request.path).path.rstrip("/") == REALTIME_PATH
        await (self.realtime if realtime else self.receiver).handle(ws)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own errors. Out of descriptors, it logs a traceback for every accept it retries (megabytes a minute
        under a flood): one line per interval is enough."""
        if "accept" in context.get("message", ""):
            self.log.warning("accept", f"{context['message']}: {context.get('exception')}")
            return
        loop.default_exception_handler(context)

    def turn_ended(self, session: Session, t: Turn, again: bool) -> None:
        self.metrics.observe_turn(t.metrics(), again)
        if self.recorder is not None:
            self.recorder.save_turn(session, t, again)

    async def close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close a connection the server was serving, counted by its code (/metrics)."""
        self.metrics.closed.labels(str(code)).inc()
        await close_within(ws, code, reason)


def legacy_clients_allowed(args: argparse.Namespace) -> bool:
    """--legacy_clients auto: CleanS2S's client, which cannot keep its session private, only on a server that no
    other machine reaches and that wants no token."""
    if args.legacy_clients != "auto":
        return args.legacy_clients == "allow"
    local = all(host == "localhost" or is_loopback(host) for host in (args.recv_host, args.send_host))
    return local and not args.auth_token


class ReceiverSocket:
    """Client -> server: each connection opens or resumes its session, and its messages, checked and within its
    limits, go to that session."""

    def __init__(self, server: VoiceAgentServer):
        self.server, self.args, self.log = server, server.args, server.log
        self.sessions, self.admission, self.legacy_allowed = server.sessions, server.admission, server.legacy_allowed
        self.max_samples = self.args.max_audio_ms_per_message * self.args.sample_rate // 1000  # per message, at the client's rate

    async def handle(self, ws: ServerConnection) -> None:
        async with self.admission.serving(ws) as writer:
            if writer is None:
                return
            conn = ReceiverConnection(ws, writer, self.admission.connections[ws], self.args.max_messages_per_s)
            try:
                self.open(conn)
                async with self.closed_when_idle(conn):
                    while (message := await self.next_message(conn)) is not None:
                        try:
                            await self.on_message(conn, message)
                        except BadMessage as exc:
                            self.report(conn, exc.code, str(exc))
                            if isinstance(message, str):
                                writer.send(PLACEHOLDER)
            finally:
                if conn.link is not None:
                    self.sessions.detach(conn.link, conn)

    def open(self, conn: ReceiverConnection) -> None:
        """An extended client names its uid in the URL: it gets a new session, or, presenting a key, its own back, and
        the session's key in a ready event. A legacy client names its uid in its first message (see on_message)."""
        uid = query_uid(conn.ws)
        if uid is None:
            if not self.legacy_allowed:
                raise Refused(4426, "legacy clients are not allowed here: put ?uid= in the socket URLs (the extended protocol)")
            return
        key = AccessPolicy.presented(conn.ws.request, AccessPolicy.KEY_PREFIX, "key")
        protocol = query_protocol(conn.ws)
        link = self.sessions.resume(uid, key, conn) if key else self.sessions.open(uid, conn, extended=True)
        link.session.can_pause = protocol >= PAUSING_PROTOCOL
        conn.writer.send(SessionReadyEvent(uid, session_key=link.key, resumed=bool(key)).to_json())

    async def next_message(self, conn: ReceiverConnection) -> Any:
        """The next message, read no sooner than the rate limit allows; None when the server is shutting down (what
        the library still holds of a client that was slowed down is not worth the wait)."""
        if self.server.stopped.is_set():
            return None
        await self.slow_down(conn, conn.rate.take(), "rate_limited",
                             f"more than {self.args.max_messages_per_s} messages a second; the rest are read at that rate")
        message = await conn.ws.recv()
        conn.active_at = now()
        return message

    @contextlib.asynccontextmanager
    async def closed_when_idle(self, conn: ReceiverConnection) -> AsyncIterator[None]:
        """Inside it, the connection is closed after --idle_timeout_s without a message; listening to an answer is
        not idle. A message only notes its time (next_message): the timer is looked at when it runs out, not moved
        at every message, which would cost more than the rest of reading one."""
        watchdog = asyncio.create_task(self._close_when_idle(conn)) if self.args.idle_timeout_s else None
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _close_when_idle(self, conn: ReceiverConnection) -> None:
        idle_s = self.args.idle_timeout_s
        while True:
            left = conn.active_at + idle_s - now()
            if left <= 0:
                if conn.link is None or not conn.link.session.assistant_busy():
                    break
                conn.active_at, left = now(), idle_s  # listening to an answer is not idle
            await asyncio.sleep(left)
        await self.server.close(conn.ws, 4408, f"idle: no message for {idle_s:g} s")

    async def slow_down(self, conn: ReceiverConnection, wait_s: float, code: str, message: str) -> None:
        """Wait before reading on, telling the client why (at most once a second)."""
        if wait_s <= 0:
            return
        if now() - conn.last_refusal >= 1:
            conn.last_refusal = now()
            self.log.warning(f"slowed {code}", f"slowed down the client at {conn.address}: {message}")
            if conn.link is not None:
                conn.link.session.send_event(ErrorEvent(code, message))
        await asyncio.sleep(wait_s)

    async def on_message(self, conn: ReceiverConnection, message: Any) -> None:
        """Check one message from the receiver socket and hand it to its session; answer a JSON one."""
        data = message if isinstance(message, bytes) else parse_json(message)
        if conn.link is None:
            if isinstance(data, bytes):
                raise BadMessage("no_session", "send ?uid= in the URL before binary audio")
            if "uid" not in data:
                raise BadMessage("no_uid", "the first message must carry a string uid")
            try:
                uid = check_uid(data["uid"])
            except BadMessage as exc:
                raise Refused(1008, str(exc)) from None
            self.sessions.open(uid, conn, extended=False)
        elif isinstance(data, dict) and "uid" in data and data["uid"] != conn.link.session.uid:
            raise BadMessage("uid_mismatch", "this connection belongs to another uid")
        actions = read_actions(data, self.max_samples, self.args.max_text_chars)
        await self.in_real_time(conn, sum(len(a.audio) for a in actions if isinstance(a, ClientAudio)))
        await take(conn.link.session, actions)
        if isinstance(data, dict):  # a JSON message is answered once its audio is heard
            for reply in [VAD_DETECTED] * await conn.link.session.caught_up() or [PLACEHOLDER]:
                conn.writer.send(reply)

    async def in_real_time(self, conn: ReceiverConnection, samples: int) -> None:
        """Wait, before the session hears this many samples of audio (at the client's rate), while they would take the
        session more than --max_audio_ahead_s ahead of real time: every second of audio costs the server's CPU (the VAD,
        the turn model), so a client that sent a hundred seconds a second would cost as much as a hundred people
        talking. Nothing is lost."""
        if samples:
            await self.slow_down(conn, conn.link.audio.take(samples), "audio_too_fast",
                                 f"audio more than {self.args.max_audio_ahead_s:g} s ahead of real time; the rest is heard in real time")

    def report(self, conn: ReceiverConnection, code: str, message: str) -> None:
        """A bad message: an error event to the session's clients, and a log line (at most one per code and interval)."""
        self.log.warning(f"bad {code}", f"bad message from {conn.address}: {message}")
        if conn.link is not None:
            conn.link.session.send_event(ErrorEvent(code, message))


class ReceiverConnection:
    """One client on the receiver socket: its session (once it has named its uid) and its limits."""

    def __init__(self, ws: ServerConnection, writer: ClientWriter, address: str, max_messages_per_s: float):
        self.ws, self.writer, self.address = ws, writer, address
        self.link: Optional[SessionLink] = None
        self.rate = RateLimit(max_messages_per_s)
        self.active_at = now()  # when it last sent a message, or was last found listening to an answer
        self.last_refusal = -1.0  # when the last rate_limited or audio_too_fast went out: one a second is enough


def query_uid(ws: ServerConnection) -> Optional[str]:
    values = parse_qs(urlparse(ws.request.path).query).get("uid")
    return check_uid(values[0]) if values else None


def query_protocol(ws: ServerConnection) -> int:
    """The version of the extended protocol the client speaks (?protocol=N on the receiver): 2, where clients written
    for version 2 say nothing."""
    values = parse_qs(urlparse(ws.request.path).query).get("protocol")
    if not values:
        return 2
    if not re.fullmatch(r"[0-9]{1,3}", values[0]) or int(values[0]) < 2:
        raise BadMessage("bad_protocol", "?protocol= must be a version of the extended protocol, 2 or more "
                                         f"(this server speaks up to {PROTOCOL_VERSION})")
    return int(values[0])


class SessionRegistry:
    """The open sessions, an extended one found by its key, a legacy one by its uid (its only name): opened,
    resumed, left and ended here, each with a task that writes its output to its clients."""

    def __init__(self, server: VoiceAgentServer):
        self.server, self.args, self.metrics = server, server.args, server.metrics
        self.by_key: dict = {}  # session key -> SessionLink
        self.legacy: dict = {}  # uid -> SessionLink, for CleanS2S's client
        self.legacy_senders: set = set()

    def all(self) -> list:
        return list(self.by_key.values()) + list(self.legacy.values())

    def open(self, uid: str, conn: ReceiverConnection, extended: bool) -> SessionLink:
        """A new session for the client on `conn`, which becomes its receiver."""
        if not extended and uid in self.legacy:
            raise Refused(1008, f"uid {uid} already has a connected receiver")
        self.make_room()
        session = Session(uid, self.server.pipeline, self.args, legacy=not extended, on_turn_end=self.server.turn_ended)
        return self.register(SessionLink(session, extended, conn.address, self.args.sample_rate, self.args.max_audio_ahead_s), conn)

    def open_realtime(self, conn: ReceiverConnection, model: str) -> SessionLink:
        """A session for an OpenAI Realtime client: its one connection speaks for it and hears it, and it ends with it."""
        self.make_room()
        session = RealtimeSession(self.server.pipeline, self.args, model, on_turn_end=self.server.turn_ended)
        link = SessionLink(session, True, conn.address, REALTIME_RATE, self.args.max_audio_ahead_s, RealtimeOutput(session).messages)
        link.resumable = False
        link.senders.add(conn)
        return self.register(link, conn)

    def make_room(self) -> None:
        if len(self.by_key) + len(self.legacy) >= self.args.max_sessions:
            detached = [s for s in self.by_key.values() if s.receiver is None]
            if not detached:
                raise Refused(1013, f"server full: {self.args.max_sessions} sessions; try again later")
            self.end(min(detached, key=lambda s: s.detached_at))  # the one left longest ago gives way

    def register(self, link: SessionLink, conn: ReceiverConnection) -> SessionLink:
        """A new session's link, with `conn` as its receiver, and a task that writes its output to its clients."""
        session = link.session
        (self.by_key if link.extended else self.legacy)[link.key if link.extended else session.uid] = link
        asyncio.get_running_loop().create_task(self.send_output(link), name=f"sender-{session.tag}")
        self.metrics.sessions.inc()
        logger.info("session %s opened from %s (%d active)", session.tag, conn.address, len(self.all()))
        link.receiver, conn.link = conn, link
        return link

    def find(self, uid: str, key: str) -> SessionLink:
        """The extended session whose key the client presents, if the uid is its own too."""
        link = self.by_key.get(key) if key else None
        if link is None or not hmac.compare_digest(link.session.uid.encode(), uid.encode()):
            raise CLOSE_UNKNOWN_SESSION
        return link

    def resume(self, uid: str, key: str, conn: ReceiverConnection) -> SessionLink:
        """The extended session whose key the client presents, with `conn` as its receiver; its old receiver, if still
        open, gives way."""
        link = self.find(uid, key)
        old = link.receiver
        if old is not None:
            old.link = None
            asyncio.get_running_loop().create_task(
                self.server.close(old.ws, 4409, "replaced by a newer connection to this session"))
        link.detached_at = None
        logger.info("session %s resumed from %s", link.session.tag, conn.address)
        link.receiver, conn.link = conn, link
        return link

    def detach(self, link: SessionLink, conn: ReceiverConnection) -> None:
        """The session's receiver closed. An extended session waits --resume_s for its client to come back; a legacy
        one ends."""
        if link.receiver is not conn:
            return
        link.receiver = None
        if not link.resumable or self.args.resume_s <= 0:
            self.end(link)
            return
        link.session.leave()
        link.detached_at = now()
        logger.info("session %s left; kept %g s for its client to come back", link.session.tag, self.args.resume_s)
        asyncio.get_running_loop().call_later(self.args.resume_s, self.expire, link, link.detached_at)

    def expire(self, link: SessionLink, detached_at: float) -> None:
        if link.detached_at == detached_at:  # not come back since
            self.end(link)

    def end(self, link: SessionLink) -> None:
        registry, name = (self.by_key, link.key) if link.extended else (self.legacy, link.session.uid)
        if registry.get(name) is not link:
            return
        del registry[name]
        self.metrics.sessions.dec()
        link.session.close()
        for conn in list(link.senders):
            asyncio.get_running_loop().create_task(self.server.close(conn.ws, 1000, "session ended"))
        logger.info("session %s closed (%d active)", link.session.tag, len(self.all()))

    async def send_output(self, link: SessionLink) -> None:
        """The session's output, written in its format to each of its clients' writers (which never wait)."""
        async for item in link.session.output():
            try:
                if isinstance(item, ErrorEvent):
                    self.metrics.errors.labels(item.code).inc()
                messages = link.messages(item)
                for conn in list(link.senders if link.extended else self.legacy_senders):
                    for message in messages:
                        conn.writer.send(message)
            except Exception:
                logger.exception("sender failed on session %s", link.session.tag)


class SessionLink:
    """What ties a session to the network: the key that proves a client owns it (a secret the receiver's `ready`
    event hands to the client that opened it), the receiver connection that speaks for it, and the sender
    connections that hear it. A legacy session (CleanS2S's client, which knows no key) is heard by every legacy
    sender connection."""

    def __init__(self, session: Session, extended: bool, address: str, sample_rate: int, ahead_s: float,
                 messages: Optional[Callable[[Any], list]] = None):
        self.session, self.extended, self.address = session, extended, address
        self.resumable = extended  # its client may come back with the key (not a legacy or Realtime client)
        self.key = secrets.token_urlsafe(24)  # 192 random bits
        self.receiver: Optional[ReceiverConnection] = None
        self.senders: set = set()  # an extended session's SenderConnections
        self.detached_at: Optional[float] = None  # its receiver closed; it ends --resume_s later unless one comes back
        self.messages = messages or (extended_messages if extended else legacy_messages)  # its format
        self.audio = RateLimit(sample_rate, burst=sample_rate * ahead_s)  # samples at the client's rate: real time


class SenderSocket:
    """Server -> client: an extended connection hears the session whose key it presents; a legacy one hears every
    legacy session."""

    def __init__(self, server: VoiceAgentServer):
        self.server, self.args, self.log = server, server.args, server.log
        self.sessions, self.admission, self.legacy_allowed = server.sessions, server.admission, server.legacy_allowed

    async def handle(self, ws: ServerConnection) -> None:
        async with self.admission.serving(ws) as writer:
            if writer is None:
                return
            conn = self.open(ws, writer, self.admission.connections[ws])
            try:
                await self.serve(conn)
            finally:
                (conn.link.senders if conn.extended else self.sessions.legacy_senders).discard(conn)

    def open(self, ws: ServerConnection, writer: ClientWriter, address: str) -> SenderConnection:
        """An extended client presents its session's key (from the receiver's ready event) and hears that session
        only; a client without a uid is CleanS2S's and hears every legacy session, never an extended one."""
        uid = query_uid(ws)
        if uid is None:
            if not self.legacy_allowed:
                raise Refused(4426, "legacy clients are not allowed here: put ?uid= in the socket URLs (the extended protocol)")
            conn = SenderConnection(ws, writer, address, None)
            self.sessions.legacy_senders.add(conn)
            return conn
        link = self.sessions.find(uid, AccessPolicy.presented(ws.request, AccessPolicy.KEY_PREFIX, "key"))
        conn = SenderConnection(ws, writer, address, link)
        link.senders.add(conn)
        writer.send(ReadyEvent(uid).to_json())
        return conn

    async def serve(self, conn: SenderConnection) -> None:
        """Clients do not write here; reading notices the close. A legacy sender is idle while no legacy session is
        open from its address: after --idle_timeout_s of that it is closed. An extended one ends with its session."""
        idle_s = None if conn.extended else self.args.idle_timeout_s or None
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    await conn.ws.recv()
            except TimeoutError:
                if not any(link.address == conn.address for link in self.sessions.legacy.values()):
                    await self.server.close(conn.ws, 4408, f"idle: no session of this client for {self.args.idle_timeout_s:g} s")
                    return


class SenderConnection:
    """One client on the sender socket. An extended client's connection belongs to one session (it presented the
    session's key); a legacy one (CleanS2S's client) hears every legacy session and keeps its own uid's messages."""

    def __init__(self, ws: ServerConnection, writer: ClientWriter, address: str, link: Optional[SessionLink]):
        self.ws, self.writer, self.address, self.link = ws, writer, address, link
        self.extended = link is not None


class RealtimeSocket:
    """/v1/realtime on the receiver port: an OpenAI Realtime client. Admitted and limited as any receiver connection
    (its token may come as `Authorization: Bearer`, as OpenAI's SDKs send a key); each connection is a session of its
    own, which no other connection can join or resume."""

    def __init__(self, server: VoiceAgentServer):
        self.server, self.args, self.receiver = server, server.args, server.receiver  # its reading and limits

    async def handle(self, ws: ServerConnection) -> None:
        async with self.server.admission.serving(ws) as writer:
            if writer is None:
                return
            if beta_client(ws.request):
                raise Refused(1008, "this server speaks the GA Realtime protocol; the beta (OpenAI-Beta: realtime=v1) is not served")
            conn = ReceiverConnection(ws, writer, self.server.admission.connections[ws], self.args.max_messages_per_s)
            model = (parse_qs(urlparse(ws.request.path).query).get("model") or ["default"])[0]
            link = self.server.sessions.open_realtime(conn, model if re.fullmatch(r"[\w.:-]{1,64}", model) else "default")
            client = RealtimeClient(link.session, self.args.max_text_chars, functools.partial(self.receiver.in_real_time, conn))
            client.opened()
            try:
                async with self.receiver.closed_when_idle(conn):
                    while (message := await self.receiver.next_message(conn)) is not None:
                        try:
                            await client.take(message)
                        except BadMessage as exc:  # answered with an error event; the session goes on
                            self.server.log.warning(f"bad {exc.code}", f"bad Realtime event from {conn.address}: {exc}")
            finally:
                self.server.sessions.detach(link, conn)


def beta_client(request: Any) -> bool:
    """A client of the Realtime protocol's beta (its event names and session shape differ from the GA's): it says so
    in a header, or, in a browser, in a subprotocol."""
    offered = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))
    return any("realtime=v1" in v for v in request.headers.get_all("OpenAI-Beta")) or "openai-beta.realtime-v1" in offered


CLOSE_TOO_SLOW = 4429


class ClientWriter:
    """Everything the server writes to one connection goes through here, so nothing ever waits for a client:
    send() queues and returns at once, and a task of the connection's own writes. A client that falls behind (more
    than --send_buffer_kb waiting, or one message not taken within --send_timeout_s) is closed with 4429: a slow or
    stuck reader costs only itself, and what waits for it is bounded."""

    def __init__(self, ws: ServerConnection, max_bytes: int, timeout_s: float, on_give_up: Callable[[str], None]):
        self.ws, self.max_bytes, self.timeout_s, self.on_give_up = ws, max_bytes, timeout_s, on_give_up
        self.pending: deque = deque()  # str or bytes messages, oldest first
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name="writer")

    def send(self, message: Any) -> None:
        if self.closed:
            return
        self.pending.append(message)
        self.pending_bytes += len(message)
        transport = self.ws.transport
        unsent = self.pending_bytes + (transport.get_write_buffer_size() if transport else 0)
        if unsent > self.max_bytes:
            self.give_up(f"too slow: more than {self.max_bytes // 1024} KiB waiting to be sent")
            return
        self.wake.set()

    async def _run(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.pending and not self.closed:
                message = self.pending.popleft()
                self.pending_bytes -= len(message)
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await self.ws.send(message)
                except TimeoutError:
                    self.give_up(f"too slow: a message waited more than {self.timeout_s:g} s to be taken")
                except websockets.ConnectionClosed:
                    self.closed = True

    def give_up(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.wake.set()
        self.on_give_up(reason)
        asyncio.get_running_loop().create_task(close_within(self.ws, CLOSE_TOO_SLOW, reason, timeout_s=2.0))

    def stop(self) -> None:
        self.closed = True
        self.wake.set()


async def close_within(ws: ServerConnection, code: int, reason: str, timeout_s: float = 3.0) -> None:
    """Close a connection with a code and a reason, or drop it if that takes longer than timeout_s (a little more than
    the library's own close_timeout of 2 s): the library waits, without a deadline, for a full send buffer to drain
    before its close can time out, and a client that does not read never drains it."""
    try:
        async with asyncio.timeout(timeout_s):
            await ws.close(code, reason)
    except TimeoutError:
        ws.transport.abort()


class Admission:
    """Which connections the server takes: the access policy's, and at most so many in all and from one address.
    Every admitted connection gets a ClientWriter, and is counted until it is released."""

    def __init__(self, server: VoiceAgentServer):
        self.server, self.args, self.metrics, self.log = server, server.args, server.metrics, server.log
        self.access = AccessPolicy(self.args.auth_token, self.args.allowed_origins)
        self.trusted_proxies = frozenset(a.strip() for a in self.args.trusted_proxies.split(",") if a.strip())
        self.connections: dict = {}  # every open, admitted WebSocket -> its client's address; closed at shutdown
        self.per_address: dict = {}  # client address -> its open connections

    async def admit(self, ws: ServerConnection) -> Optional[ClientWriter]:
        """Close a connection the access policy refuses, or one too many, before it costs anything else; else its writer."""
        address = client_address(ws, self.trusted_proxies)
        via_proxy = ws.remote_address is not None and ws.remote_address[0] in self.trusted_proxies
        secure = bool(self.args.ssl_certfile) or (via_proxy and ws.request.headers.get_all("X-Forwarded-Proto")[-1:] == ["https"])
        refusal = self.access.refusal(ws.request, secure)
        if refusal is None and len(self.connections) >= 3 * self.args.max_sessions:  # a receiver and a sender each, and spares
            refusal = Refused(1013, "server full: too many connections; try again later")
        if (refusal is None and self.per_address.get(address, 0) >= self.args.max_connections_per_client
                and not is_loopback(address)):  # the machine itself (an SSH tunnel, a local test) is one user
            refusal = Refused(1013, f"too many connections from your address ({self.args.max_connections_per_client}); try again later")
        if refusal is not None:
            await self.refuse(ws, refusal, address)
            return None
        self.connections[ws] = address
        self.per_address[address] = self.per_address.get(address, 0) + 1
        def too_slow(reason: str) -> None:
            self.log.warning("slow", f"closed a slow client from {address}: {reason}")
            self.metrics.closed.labels(str(CLOSE_TOO_SLOW)).inc()
        return ClientWriter(ws, self.args.send_buffer_kb * 1024, self.args.send_timeout_s, too_slow)

    @contextlib.asynccontextmanager
    async def serving(self, ws: ServerConnection) -> AsyncIterator[Optional[ClientWriter]]:
        """A connection from its admission to its end: its writer, None if it was refused at once. A Refused raised
        while it is served (or a BadMessage, from its URL: 1008) closes it with its code; it is released at the end."""
        writer = await self.admit(ws)
        if writer is None:
            yield None
            return
        address = self.connections[ws]
        try:
            yield writer
        except BadMessage as exc:  # a bad uid or protocol in the URL
            await self.refuse(ws, Refused(1008, str(exc)), address)
        except Refused as refusal:
            await self.refuse(ws, refusal, address)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.release(ws, writer)

    async def refuse(self, ws: ServerConnection, refusal: Refused, address: str) -> None:
        self.log.warning(f"refused {refusal.code}", f"refused a connection from {address}: {refusal.reason}")
        self.metrics.refused.labels(str(refusal.code)).inc()
        await close_within(ws, refusal.code, refusal.reason)

    def release(self, ws: ServerConnection, writer: ClientWriter) -> None:
        writer.stop()
        address = self.connections.pop(ws, None)
        if address is not None:
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]


def client_address(ws: ServerConnection, trusted_proxies: frozenset) -> str:
    """The client's IP address: the peer's, or, when the peer is a trusted proxy, the last address in
    X-Forwarded-For that no trusted proxy added (the ones before it can be anything the client wrote)."""
    address = ws.remote_address[0] if ws.remote_address else "?"
    if address not in trusted_proxies:
        return address
    forwarded = [a.strip() for h in ws.request.headers.get_all("X-Forwarded-For") for a in h.split(",") if a.strip()]
    for hop in reversed(forwarded):
        address = hop
        if hop not in trusted_proxies:
            break
    return address[:64]


class Refused(Exception):
    """A connection that may not stay: closed with `code` and `reason`, which the client can show."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


CLOSE_UNKNOWN_SESSION = Refused(4404, "unknown session or wrong session key")  # the same for any uid: it tells nothing


class AccessPolicy:
    """Who may open a socket: the shared token (--auth_token) and the page origin (--allowed_origins). Checked
    before a connection gets anything else; a refusal closes it with a code and a reason the client can show."""

    SUBPROTOCOL = "s2s"  # a browser that offers subprotocols must get one back, or it drops the connection
    TOKEN_PREFIX = "s2s.token."  # browsers cannot set headers on a WebSocket: the token rides in a subprotocol
    KEY_PREFIX = "s2s.key."  # and so does the session key
    OPENAI_KEY_PREFIX = "openai-insecure-api-key."  # how OpenAI Realtime clients in a browser send their key (the token)
    LOOPBACK = {"localhost", "127.0.0.1", "::1"}

    def __init__(self, token: Optional[str], allowed_origins: str):
        self.token = token.encode() if token else None
        self.origins = {o.strip().rstrip("/") for o in allowed_origins.split(",") if o.strip()}

    def refusal(self, request: Any, secure: bool) -> Optional[Refused]:
        """`secure`: the client's connection came over TLS (to this server, or to a trusted proxy that says so)."""
        if self.token is not None and not token_matches(self.token, self.token_presented(request)):
            return Refused(4401, "unauthorized: missing or wrong token")
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host", ""), secure):
            return Refused(4403, f"origin not allowed: {origin[:100]}")
        return None

    def token_presented(self, request: Any) -> str:
        """The token, as a subprotocol (s2s.token.TOKEN, or openai-insecure-api-key.TOKEN), ?token=, or the header
        Authorization: Bearer TOKEN (OpenAI's SDKs send their key so)."""
        bearer = next((v[7:] for v in request.headers.get_all("Authorization") if v.startswith("Bearer ")), "")
        return (self.presented(request, self.TOKEN_PREFIX, "token") or self.presented(request, self.OPENAI_KEY_PREFIX, "token")
                or bearer)

    @staticmethod
    def presented(request: Any, prefix: str, query_name: str) -> str:
        """A secret the client presents as the subprotocol PREFIX+value, or as ?query_name= in the URL; "" if none."""
        for offered in request.headers.get_all("Sec-WebSocket-Protocol"):
            for name in offered.split(","):
                if name.strip().startswith(prefix):
                    return name.strip()[len(prefix):]
        values = parse_qs(urlparse(request.path).query).get(query_name)
        return values[0] if values else ""

    def origin_allowed(self, origin: str, host: str, secure: bool = False) -> bool:
        """auto admits pages from the names the server is really reached by. A page's own host name equal to the
        Host header is not proof of that: a DNS-rebinding page (evil.example resolving to this server) sets both.
        It cannot when the name is an IP address, a loopback name, or a name whose certificate this server holds
        (TLS); any other name must be listed."""
        if "*" in self.origins or origin.rstrip("/") in self.origins:
            return True
        if "auto" not in self.origins:
            return False
        page = urlparse(origin).hostname or ""
        server = urlparse(f"//{host}").hostname or ""
        if page in self.LOOPBACK and server in self.LOOPBACK:
            return True
        return page == server and (secure or ip_address(page) is not None)

    @classmethod
    def select_subprotocol(cls, ws: ServerConnection, offered: list) -> Optional[str]:
        return next((p for p in (cls.SUBPROTOCOL, "realtime") if p in offered), None)  # "realtime": OpenAI's, in a browser


def token_matches(token: bytes, presented: str) -> bool:
    """The shared secret (--auth_token), compared in constant time."""
    return hmac.compare_digest(presented.encode(), token)


def ip_address(host: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """`host` as an IP address, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(address: str) -> bool:
    ip = ip_address(address)
    return ip is not None and ip.is_loopback


def bad_request(ws: ServerConnection, request: Any) -> Optional[Response]:
    """400 for a handshake no honest client sends, before anything reads it: several Host, Origin or
    Sec-WebSocket-Key headers."""
    for name in ("Host", "Origin", "Sec-WebSocket-Key"):
        if len(request.headers.get_all(name)) > 1:
            return ClientFiles.response(400, "text/plain", f"more than one {name} header\n".encode())
    return None


class RateLimit:
    """A token bucket: `rate` a second (messages, or samples of audio), in bursts of up to `burst` (one second's
    worth unless said). A reader take()s before it reads and waits what that says: it reads no faster than the rate,
    and TCP slows the sender down to it, at no cost to the server (dropping the excess would cost reading it)."""

    def __init__(self, rate: float, burst: Optional[float] = None):
        self.rate, self.burst = rate, burst or rate
        self.tokens, self.last = self.burst, now()

    def take(self, cost: float = 1) -> float:
        """Spend `cost` (at most a burst); returns how long to wait before going on: until the bucket is out of debt."""
        t = now()
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate) - min(cost, self.burst)
        self.last = t
        return max(0.0, -self.tokens / self.rate)


class HandshakeGate:
    """Bounds the connections still in their opening handshake: --max_pending_connections in all, and PER_PEER from
    one address (a trusted proxy excepted: it sends whole requests at once). Past a bound, the oldest of them is
    dropped: an honest handshake takes a millisecond, so what waits longest is a client that sends its request
    slowly or never. A flood of slow handshakes thus cannot use up the process's descriptors, nor keep a newcomer out."""

    PER_PEER = 16

    def __init__(self, limit: int, trusted_proxies: frozenset, on_drop: Callable[[str], None]):
        self.limit, self.trusted_proxies, self.on_drop = limit, trusted_proxies, on_drop
        self.pending: dict = {}  # GatedConnection -> its peer's address, oldest first

    def enter(self, conn: GatedConnection, peer: str) -> None:
        self.pending[conn] = peer
        if len(self.pending) > self.limit:
            self.drop(next(iter(self.pending)))
        if peer not in self.trusted_proxies:
            same_peer = [c for c, p in self.pending.items() if p == peer]  # at most `limit` to look through
            if len(same_peer) > self.PER_PEER:
                self.drop(same_peer[0])

    def drop(self, conn: GatedConnection) -> None:
        peer = self.pending.pop(conn)
        conn.transport.abort()
        self.on_drop(peer)

    def leave(self, conn: GatedConnection) -> None:
        self.pending.pop(conn, None)


class GatedConnection(ServerConnection):
    """A server connection that waits at the HandshakeGate from its accept to its request (or its end), and whose
    kernel send buffer is fixed: left to itself, Linux grows it to 4 MiB for a client that does not read, and
    ClientWriter would see the client fall behind only after that much."""

    KERNEL_SEND_BUFFER = 256 * 1024  # bytes; 6 s of 16 kHz int16 audio, and far above what a 300 ms link needs

    def __init__(self, gate: HandshakeGate, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.KERNEL_SEND_BUFFER)
        self.gate.enter(self, (transport.get_extra_info("peername") or ("?",))[0])

    def process_event(self, event: Any) -> None:
        if self.request is None:  # the request has arrived: its handshake no longer waits on the client
            self.gate.leave(self)
        super().process_event(event)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.gate.leave(self)
        super().connection_lost(exc)


class LogLimiter:
    """At most one warning per cause per interval, so no client can flood the log; the next line counts the ones
    held back."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.last: dict = {}  # cause -> when its last line was written
        self.held: dict = {}  # cause -> lines held back since
        self.lock = threading.Lock()  # the recorder thread logs through it too

    def warning(self, cause: str, message: str) -> None:
        with self.lock:
            t = now()
            if t - self.last.get(cause, -self.interval_s) < self.interval_s:
                self.held[cause] = self.held.get(cause, 0) + 1
                return
            self.last[cause] = t
            held = self.held.pop(cause, 0)
        logger.warning("%s%s", message, f" (and {held} more like it in the last {self.interval_s:g} s)" if held else "")


class ClientFiles:
    """The built browser client (a static export), served over plain HTTP on the receiver port, so one
    command starts everything. A WebSocket upgrade passes through; any other GET gets a file, or
    /s2s-config.json, which tells the page where the sender socket is."""

    CONFIG_PATH = "/s2s-config.json"

    def __init__(self, root: str, config: dict):
        self.root = os.path.realpath(root)
        self.config = json.dumps(config).encode()

    def find(self, url_path: str) -> Optional[str]:
        """The file a URL path (without its query) names: /x -> x, x.html or x/index.html; None outside the root
        or missing. Raises ValueError for a path no file can have (a NUL byte)."""
        rel = unquote(url_path, errors="strict").lstrip("/")
        if "\0" in rel:
            raise ValueError("NUL in path")
        base = os.path.realpath(os.path.join(self.root, rel))
        if base != self.root and not base.startswith(self.root + os.sep):
            return None
        for path in (base, base + ".html", os.path.join(base, "index.html")):
            if os.path.isfile(path):
                return path
        return None

    async def process_request(self, ws: ServerConnection, request: Any) -> Any:
        if "websocket" in request.headers.get("Upgrade", "").lower():
            return None
        path = request.path.split("?", 1)[0]
        if path == self.CONFIG_PATH:
            return self.response(200, "application/json", self.config)
        try:
            file = self.find(path)
        except ValueError:  # also UnicodeDecodeError: percent-escapes that are not UTF-8
            return self.response(400, "text/plain", b"bad path\n")
        if file is None:
            return self.response(404, "text/plain", b"not found\n")
        try:
            body = await asyncio.to_thread(self.read, file)
        except OSError:  # removed or unreadable since find()
            return self.response(404, "text/plain", b"not found\n")
        content_type = mimetypes.guess_type(file)[0] or "application/octet-stream"
        # Next.js puts content-hashed names under _next/static, so those never change.
        cache = "public, max-age=31536000, immutable" if "/_next/static/" in path else "no-cache"
        return self.response(200, content_type, body, cache)

    @staticmethod
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def response(status: int, content_type: str, body: bytes, cache: str = "no-cache") -> Response:
        headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                           ("Cache-Control", cache), ("X-Content-Type-Options", "nosniff"), ("Connection", "close")])
        return Response(status, http.HTTPStatus(status).phrase, headers, body)


def public_socket(address: str) -> Optional[dict]:
    """A --public_*_url as /s2s-config.json tells it: {"port": P} for ":P" (the page's own host), or {"url": U,
    "port": P} for a ws:// or wss:// URL (the port too, for pages that read only ports). None if it is neither."""
    if re.fullmatch(r":\d{1,5}", address):
        port = int(address[1:])
        return {"port": port} if 0 < port < 65536 else None
    try:
        url = urlparse(address)
        port = url.port or (443 if url.scheme == "wss" else 80)
    except ValueError:  # a port out of range or not a number
        return None
    if url.scheme not in ("ws", "wss") or not url.hostname or url.query or url.fragment:
        return None
    return {"url": address, "port": port}


def page_config(args: argparse.Namespace) -> dict:
    """/s2s-config.json: where the page opens its two sockets, the public addresses when a proxy stands in front."""
    config = {"protocol": PROTOCOL_VERSION, "sample_rate": SAMPLE_RATE}
    for side, public, port in (("receiver", args.public_receiver_url, args.recv_port),
                               ("sender", args.public_sender_url, args.send_port)):
        for key, value in (public_socket(public) if public else {"port": port}).items():
            config[f"{side}_{key}"] = value
    return config


def find_client_dir(client_dir: str) -> Optional[str]:
    """--client_dir as a folder to serve, or None; "auto" is the built client beside this file, if any."""
    if client_dir == "auto":
        built = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frontend_nextjs", "out")
        return built if os.path.isfile(os.path.join(built, "index.html")) else None
    return client_dir or None


# ------------------------------------------------------------------------------------------------
# Saving turns (--save_data): a writer thread, so file I/O never blocks the event loop.
# ------------------------------------------------------------------------------------------------

class TurnRecorder:
    """Writes each session's turns into a folder of its own, DIR/<start time>-<uid hash>-<random>/, a name no other
    session gets: no later session, with the same uid or any other, can write over them. Files appear whole (written
    to a temp file, then renamed); a failed write removes its temp file, and the writer thread first removes those a
    crash left. Saving stops, with one warning, when DIR holds --save_data_max_mb; the queue of files to write is
    bounded too."""

    TMP = ".tmp"
    MAX_QUEUED = 256  # files waiting to be written; past it a file is dropped (and counted in the log)

    def __init__(self, directory: str, max_bytes: float, log: LogLimiter):
        self.dir, self.max_bytes, self.log = directory, max_bytes, log
        os.makedirs(directory, exist_ok=True)
        self.used = 0  # bytes DIR holds, measured by the writer thread before its first file
        self.queue: queue.Queue = queue.Queue(self.MAX_QUEUED)
        self.full_warned = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self.thread.start()

    def _clean_and_measure(self) -> int:
        """Remove temp files left by a crash; return the bytes DIR holds. A walk over every saved file: on the writer
        thread, so a large DIR does not hold up start-up."""
        used = 0
        for root, _, files in os.walk(self.dir):
            for name in files:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    if name.endswith(self.TMP):
                        os.remove(path)
                    else:
                        used += os.path.getsize(path)
        return used

    def session_dir(self, session: Session) -> str:
        """The session's own folder, made on its first saved file."""
        if session.save_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            session.save_dir = os.path.join(self.dir, f"{stamp}-{session.tag}-{secrets.token_hex(4)}")
        return session.save_dir

    def save_turn(self, session: Session, t: Turn, again: bool) -> None:
        """A turn that ended: what was heard (once), said and measured (again, when a cut-in came as it played)."""
        folder = self.session_dir(session)
        if t.heard_audio is not None and not again:
            self._put(folder, f"turn{t.number:05d}_input.wav", wav_bytes(to_pcm16(t.heard_audio)))
        record = {"uid": session.uid, "turn": t.number, "spoken": t.spoken, "question": t.question,
                  "answer": t.heard_text(), "interrupted": t.state is TurnState.INTERRUPTED, "metrics": t.metrics()}
        text = json.dumps(record, ensure_ascii=False, indent=1)
        self._put(folder, f"turn{t.number:05d}.json", text.encode("utf-8", "backslashreplace"))  # a lone surrogate stays readable
        if t.answer_audio:
            self._put(folder, f"turn{t.number:05d}_answer.wav", wav_bytes(b"".join(t.answer_audio)))

    def _put(self, folder: str, name: str, data: bytes) -> None:
        try:
            self.queue.put_nowait((folder, name, data))
        except queue.Full:
            self.dropped += 1
            self.log.warning("save_queue_full", f"--save_data: the disk is slower than the turns; {self.dropped} files not saved so far")

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        self.used = self._clean_and_measure()
        while True:
            item = self.queue.get()
            if item is None:
                return
            folder, name, data = item
            if self.max_bytes and self.used + len(data) > self.max_bytes:
                if not self.full_warned:
                    self.full_warned = True
                    logger.warning("--save_data: %s holds its budget of %.0f MiB (--save_data_max_mb); no more turns are saved "
                                   "until it is emptied and the server restarted", self.dir, self.max_bytes / 2**20)
                continue
            self._write(folder, name, data)

    def _write(self, folder: str, name: str, data: bytes) -> None:
        path = os.path.join(folder, name)
        try:
            os.makedirs(folder, exist_ok=True)
            try:  # write then rename: a reader never sees half a file
                with open(path + self.TMP, "wb") as f:
                    f.write(data)
                os.replace(path + self.TMP, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.remove(path + self.TMP)  # a full disk stays no fuller than it was
                raise
            self.used += len(data)
        except OSError as exc:
            self.log.warning("save_failed", f"--save_data: could not save {path}: {exc}")


def wav_bytes(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Operations: Prometheus metrics, a health check for nginx and Kubernetes probes, logs a machine can read.
# ------------------------------------------------------------------------------------------------

TURN_FIGURES = ("eot_wait_ms", "turn_model_ms", "asr_ms", "llm_first_token_ms", "llm_first_chunk_ms", "tts_first_audio_ms", "send_ms",
                "first_audio_ms", "voice_to_voice_ms", "barge_in_ms", "answer_heard_ms", "speculated_ms")  # the per-turn metrics, and voice-to-voice
MS_BUCKETS = (10, 25, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)


class ServerMetrics:
    """What the server counts for Prometheus, in a registry of its own."""

    def __init__(self):
        pc = require("prometheus_client", "pip install -r requirements.txt")
        self.registry = pc.CollectorRegistry()
        self.exposition = functools.partial(pc.generate_latest, self.registry)
        r = {"registry": self.registry}
        self.sessions = pc.Gauge("s2s_sessions", "Sessions open, those waiting --resume_s for their client included", **r)
        self.refused = pc.Counter("s2s_connections_refused", "Connections refused, by close code (docs/protocol.md)", ["code"], **r)
        self.closed = pc.Counter("s2s_connections_closed", "Connections the server closed while serving them, by close code", ["code"], **r)
        self.handshakes_dropped = pc.Counter("s2s_handshakes_dropped", "Connections dropped in their opening handshake "
                                             "(--max_pending_connections)", **r)
        self.turns = pc.Counter("s2s_turns", "Turns finished, by whether the user cut them off", ["interrupted"], **r)
        self.resumed = pc.Counter("s2s_answers_resumed", "Times an answer paused for speech over it and went on: a "
                                  "backchannel or a noise (--backchannels)", **r)
        self.speculations = pc.Counter("s2s_speculations", "Tentative answers (--speculate), by whether the turn's end "
                                       "took them or the user spoke on", ["outcome"], **r)
        self.llm_requests_discarded = pc.Counter("s2s_llm_requests_discarded", "LLM requests spent on tentative answers "
                                                 "that were dropped (--speculate)", **r)
        self.errors = pc.Counter("s2s_errors", "Error events sent to clients, by code", ["code"], **r)
        self.turn_ms = pc.Histogram("s2s_turn_ms", "Per-turn timings in ms, as in the metrics event; voice_to_voice_ms is "
                                    "eot_wait_ms + first_audio_ms", ["figure"], buckets=MS_BUCKETS, **r)
        self.loop_lag_ms = pc.Histogram("s2s_event_loop_lag_ms", "How late the event loop ran a timer, checked every "
                                        f"{LoopWatch.PROBE_S * 1000:g} ms: every message, VAD round and audio piece waits as "
                                        "long", buckets=LAG_BUCKETS, **r)
        self.gc_pause_ms = pc.Histogram("s2s_gc_pause_ms", "Garbage collections, by generation, and how long each held "
                                        "every thread", ["generation"], buckets=LAG_BUCKETS, **r)

    def observe_turn(self, m: dict, again: bool) -> None:
        if again:  # reported before; now only its barge-in is new
            self.turn_ms.labels("barge_in_ms").observe(m["barge_in_ms"])
            self.turn_ms.labels("answer_heard_ms").observe(m["answer_heard_ms"])
            return
        self.turns.labels(str(m["interrupted"]).lower()).inc()
        self.resumed.inc(m["resumed"])
        self.speculations.labels("taken").inc(int(m["speculated"]))
        self.speculations.labels("discarded").inc(m["speculations_discarded"])
        self.llm_requests_discarded.inc(m["llm_requests_discarded"])
        figures = dict(m, voice_to_voice_ms=None if m["first_audio_ms"] is None else m["eot_wait_ms"] + m["first_audio_ms"])
        for name in TURN_FIGURES:
            if figures.get(name) is not None:
                self.turn_ms.labels(name).observe(figures[name])


LAG_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)  # ms


class LoopWatch:
    """Where a loaded server's time goes first, for /metrics: how late the event loop runs what is due, and how
    long each garbage collection holds every thread. A 64 ms microphone frame is heard no sooner than the loop gets
    to it, so a loop late by more than a frame is a server that carries more sessions than it can."""

    PROBE_S = 0.05  # a timer every 50 ms: 20 wake-ups a second, nothing beside the load it measures

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.gc_started = 0.0
        self.pauses: deque = deque(maxlen=1000)  # (generation, ms) not yet observed

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        gc.callbacks.append(self.on_gc)
        probe = asyncio.get_running_loop().create_task(self.probe())
        try:
            yield
        finally:
            probe.cancel()
            gc.callbacks.remove(self.on_gc)

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.PROBE_S
            await asyncio.sleep(self.PROBE_S)
            self.metrics.loop_lag_ms.observe(max(0.0, loop.time() - due) * 1000)
            while self.pauses:
                generation, ms = self.pauses.popleft()
                self.metrics.gc_pause_ms.labels(str(generation)).observe(ms)

    def on_gc(self, phase: str, info: dict) -> None:
        """(In whichever thread collects, every thread held: a note only, observed by the probe, since a histogram
        takes a lock that the thread collecting may hold.)"""
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self.gc_started) * 1000))


class OpsEndpoints:
    """GET /metrics (Prometheus text; with --auth_token, only for `Authorization: Bearer TOKEN` or ?token=) and GET
    /healthz (200 once the models are loaded and every stage runs, else 503; open to all: it tells nothing more). On
    the receiver port, and with --ops_port on a port of their own that is up before the models load."""

    def __init__(self, token: Optional[str]):
        self.token = token.encode() if token else None
        self.metrics = ServerMetrics()
        self.live: Optional[Callable[[], bool]] = None  # set by the server while it serves: are the stages running

    def response(self, path: str, headers: Any) -> Optional[Response]:
        """The answer to a GET of `path`, or None for a path that is not theirs."""
        route = path.split("?", 1)[0]
        if route == "/healthz":
            healthy = self.live is not None and self.live()
            return ClientFiles.response(200 if healthy else 503, "text/plain", b"ok\n" if healthy else b"not ready\n")
        if route != "/metrics":
            return None
        if self.token is not None:
            bearer = next((v[7:] for v in headers.get_all("Authorization") if v.startswith("Bearer ")), None)
            presented = bearer if bearer is not None else (parse_qs(urlparse(path).query).get("token") or [""])[0]
            if not token_matches(self.token, presented):
                return ClientFiles.response(401, "text/plain", b"unauthorized: missing or wrong token\n")
        return ClientFiles.response(200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.exposition())

    def serve_http(self, host: str, port: int) -> None:
        """The same two paths on a port of their own, in a thread, from now on."""
        ops = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = ops.response(self.path, Headers(self.headers.items())) or \
                    ClientFiles.response(404, "text/plain", b"not found\n")
                self.send_response(answer.status_code)
                for name, value in answer.headers.raw_items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a log line each
                pass

        httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, name="ops-http", daemon=True).start()
        logger.info("metrics and health: http://%s:%d/metrics, /healthz", host, port)


class JsonLogFormatter(logging.Formatter):
    """--log_format json: one JSON object a line. A turn's line carries its figures as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                 **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


if __name__ == "__main__":
    main()
