"""WebSocket clients for tests and benchmarks: they stream WAV speech in real time, as a microphone would."""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

SAMPLE_RATE = 16000
CHUNK = 1024  # samples per message (64 ms), as CleanS2S's browser client sends


def load_wav(path: str) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1, path
    return audio


def voiced_span(audio: np.ndarray) -> tuple:
    """(first, last + 1) sample of speech: 10 ms frames louder than -40 dBFS RMS."""
    frames = audio[:len(audio) // 160 * 160].reshape(-1, 160)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.01)
    return loud[0] * 160, (loud[-1] + 1) * 160


@dataclass
class Received:
    t: float  # time.monotonic() on arrival
    kind: str  # an event name, "audio" (extended binary), or "legacy"
    data: dict = field(default_factory=dict)
    pcm: bytes = b""


class Client:
    """Base: two sockets, a reader task collecting everything the sender socket says."""

    def __init__(self, recv_url: str, send_url: str, uid: str | None = None, **connect_kwargs):
        self.uid = uid or str(uuid.uuid4())
        self.recv_url, self.send_url = recv_url, send_url
        self.connect_kwargs = connect_kwargs  # for websockets' connect(): subprotocols, origin, ssl
        self.received: list = []
        self.replies: list = []  # what the receiver socket answered
        self.new_item = asyncio.Event()
        self.speech_onsets: list = []  # time.monotonic() when non-silent audio was first sent, per stream_wav

    async def __aenter__(self) -> Client:
        self.recv = await connect(self._recv_url(), max_size=None, **self.connect_kwargs)
        await self.on_receiver_open()
        self.send = await connect(self._send_url(), max_size=None, **self.sender_kwargs())
        self.readers = [asyncio.create_task(self._read_sender()), asyncio.create_task(self._read_replies())]
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self.readers:
            task.cancel()
        await self.recv.close()
        await self.send.close()

    async def _read_replies(self) -> None:
        async for msg in self.recv:
            self.replies.append(json.loads(msg))
            self.on_reply(self.replies[-1])

    def on_reply(self, reply: dict) -> None:
        pass

    async def on_receiver_open(self) -> None:
        pass

    def sender_kwargs(self) -> dict:
        return self.connect_kwargs

    async def _read_sender(self) -> None:
        async for msg in self.send:
            self.received.append(self.parse(msg))
            self.new_item.set()

    async def wait_for(self, predicate, timeout: float = 20.0) -> Received:
        """The first received item (old or new) for which predicate(item) is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for item in self.received[seen:]:
                if predicate(item):
                    return item
            seen = len(self.received)
            self.new_item.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing matched within {timeout}s; received: {[(r.kind, r.data) for r in self.received][-10:]}")
            try:
                await asyncio.wait_for(self.new_item.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def stream_wav(self, path: str, trailing_silence_s: float = 1.0) -> None:
        """Send speech in real time, then silence, so the VAD hears the end of the turn."""
        await self.stream(load_wav(path), trailing_silence_s)

    async def stream(self, speech: np.ndarray, trailing_silence_s: float = 1.0) -> None:
        """stream_wav() of 16 kHz float32 samples."""
        audio = np.concatenate([speech, np.zeros(int(trailing_silence_s * SAMPLE_RATE), np.float32)])
        start = time.monotonic()
        onset = None
        for i in range(0, len(audio), CHUNK):
            chunk = audio[i:i + CHUNK]
            if onset is None and np.abs(chunk).max() > 0.01:
                onset = time.monotonic()
                self.speech_onsets.append(onset)
            await self.send_audio(chunk)
            await asyncio.sleep(max(0.0, start + (i + CHUNK) / SAMPLE_RATE - time.monotonic()))  # microphone pace


class ExtendedClient(Client):
    """Speaks the extended protocol: ?uid= on both sockets, binary int16 frames both ways. The receiver opens
    first, saying which version it speaks (?protocol=, 3 unless told: it can pause); its ready event holds the
    session key, which the sender presents as a subprotocol. protocol=None says nothing, as clients of version 2."""

    def __init__(self, *args, protocol: int | None = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.protocol = protocol

    async def on_receiver_open(self) -> None:
        self.ready = json.loads(await asyncio.wait_for(self.recv.recv(), 10))
        assert self.ready["event"] == "ready", self.ready
        self.key = self.ready["session_key"]

    def sender_kwargs(self) -> dict:
        return {**self.connect_kwargs, "subprotocols": with_key(self.connect_kwargs.get("subprotocols"), self.key)}

    def _recv_url(self) -> str:
        return f"{self.recv_url}/?uid={self.uid}" + ("" if self.protocol is None else f"&protocol={self.protocol}")

    def _send_url(self) -> str:
        return f"{self.send_url}/?uid={self.uid}"

    def parse(self, msg) -> Received:
        if isinstance(msg, bytes):
            turn, seq = struct.unpack("<II", msg[:8])
            return Received(time.monotonic(), "audio", {"turn": turn, "seq": seq}, msg[8:])
        data = json.loads(msg)
        return Received(time.monotonic(), data["event"], data)

    async def send_audio(self, chunk: np.ndarray) -> None:
        await self.recv.send((np.clip(chunk, -1, 1) * 32767).astype("<i2").tobytes())

    async def send_text(self, text: str) -> None:
        await self.recv.send(json.dumps({"type": "user_input", "uid": self.uid, "text": text}))

    def events(self, kind: str, turn: int | None = None) -> list:
        return [r for r in self.received if r.kind == kind and (turn is None or r.data.get("turn") == turn)]


def with_key(subprotocols: list | None, key: str) -> list:
    """The subprotocols a client offers to present a session key (and "s2s", which the server selects)."""
    offered = [p for p in (subprotocols or ["s2s"]) if not p.startswith("s2s.key.")]
    return (offered if "s2s" in offered else ["s2s", *offered]) + [f"s2s.key.{key}"]


class LegacyClient(Client):
    """CleanS2S's browser client, message for message: base64 float32 audio with is_playing, no uid on the
    sender socket, and the same counting: +1 per "VAD detected" reply and per text sent. It keeps only
    sender messages whose uid and user_input_count match its own, as that client does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.question_count = 0
        self.is_playing = False

    def _recv_url(self) -> str:
        return self.recv_url

    def _send_url(self) -> str:
        return self.send_url

    def on_reply(self, reply: dict) -> None:
        if reply.get("return_info"):
            self.question_count += 1

    def parse(self, msg) -> Received:
        data = json.loads(msg)
        kept = data.get("uid") == self.uid and int(data.get("user_input_count")) == self.question_count
        return Received(time.monotonic(), "legacy" if kept else "dropped", data)

    async def send_audio(self, chunk: np.ndarray) -> None:
        await self.recv.send(json.dumps({
            "type": "audio_input", "uid": self.uid, "is_playing": str(self.is_playing).lower(),
            "audio": base64.b64encode(chunk.astype("<f4").tobytes()).decode()}))

    async def send_text(self, text: str) -> None:
        await self.recv.send(json.dumps({"type": "user_input", "uid": self.uid, "text": text}))
        self.question_count += 1


@dataclass
class Clip:
    """One audio message as CleanS2S's client plays it."""
    turn: int  # its user_input_count
    text: str  # its answer_text: shown as a bubble when the clip starts
    end: bool  # its end_flag
    seconds: float
    started: float | None = None  # time.monotonic() when it started playing


class CleanS2SClient(LegacyClient):
    """CleanS2S's client as its user hears and sees it (its useVoiceClient.ts, VoiceProvider.tsx, useSoundPlayer.ts
    and useMessages.ts): every kept audio message is queued QUEUE_DELAY_S after it arrives; clips play one after
    another; a "VAD detected" reply while a clip plays stops that clip and empties the queue, and nothing else (a
    message still in its delay is queued afterwards). A message's text shows as a bubble when its clip starts, and
    the answer ends (the "still answering" bubble goes) only when a clip whose message had text and end_flag starts."""

    QUEUE_DELAY_S = 0.2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queue: list = []
        self.playing: Clip | None = None
        self.clip_done: asyncio.TimerHandle | None = None
        self.clips: list = []  # every clip queued, in order
        self.cleared_at: list = []  # time.monotonic() of each stop
        self.ended = asyncio.Event()  # set when an answer ends on screen

    def on_reply(self, reply: dict) -> None:
        super().on_reply(reply)
        if reply.get("return_info") and self.playing is not None:
            self.clip_done.cancel()
            self.playing, self.queue, self.is_playing = None, [], False
            self.cleared_at.append(time.monotonic())

    def parse(self, msg) -> Received:
        r = super().parse(msg)
        if r.kind == "legacy" and r.data["answer_audio"]:
            clip = Clip(r.data["user_input_count"], r.data["answer_text"] or "", r.data["end_flag"],
                        len(base64.b64decode(r.data["answer_audio"])) / 2 / SAMPLE_RATE)
            asyncio.get_running_loop().call_later(self.QUEUE_DELAY_S, self._enqueue, clip)
        return r

    def _enqueue(self, clip: Clip) -> None:
        self.clips.append(clip)
        self.queue.append(clip)
        if self.playing is None:
            self._play_next()

    def _play_next(self) -> None:
        self.playing = self.queue.pop(0) if self.queue else None
        self.is_playing = self.playing is not None
        if self.playing is not None:
            self.playing.started = time.monotonic()
            if self.playing.text and self.playing.end:
                self.ended.set()
            self.clip_done = asyncio.get_running_loop().call_later(self.playing.seconds, self._play_next)

    def bubbles(self, turn: int) -> list:
        """The texts shown for a turn's answer, in order."""
        return [c.text for c in self.clips if c.turn == turn and c.started is not None and c.text]

    def answer_ended(self, turn: int) -> bool:
        return any(c.turn == turn and c.started is not None and c.text and c.end for c in self.clips)

    async def until_answer_ended(self, turn: int, timeout: float) -> bool:
        """Whether the turn's answer ends on screen within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.answer_ended(turn):
            self.ended.clear()
            try:
                await asyncio.wait_for(self.ended.wait(), deadline - time.monotonic())
            except (TimeoutError, ValueError):
                return False
        return True
