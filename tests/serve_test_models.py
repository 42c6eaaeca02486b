"""The real server, with an ASR and a TTS of fixed latency that need no model weights (for end-to-end tests
and benchmarks). The ASR reports how much speech it heard, so a test can tell which utterance reached it.

    python tests/serve_test_models.py --asr fixed --asr_latency_ms 50 --llm openai --lm_model_url ... --tts fixed

Fault switches, for the fault-injection tests: `--asr_fail_over_s S` makes the fixed ASR raise on an utterance
longer than S seconds, `--tts_fail_on TEXT` makes the fixed TTS raise on a chunk containing TEXT, and
`--asr_stall_over_s` / `--tts_stall_on` make them take `--stall_s` longer there instead (logged, so a test
knows the stage is busy).

For the turn-taking benchmark, `--asr_transcripts FOLDER` (bench/fixtures/turn_taking) makes the fixed ASR hear the
words of the speech fixture it is given (found by its audio; nothing for a noise), so backchannels sound like
backchannels, and each half of a question with a pause in it by itself; an utterance that is none of these is heard
as before ("heard 1.2 seconds").
"""
import json
import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import soundfile as sf
from scipy.signal import correlate, resample_poly

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2s_server_pipeline as s2s  # noqa: E402

logger = logging.getLogger("s2s.test_models")


class FixtureTranscripts:
    """The words of each speech fixture of a folder (its fixtures.json), and of each half of one with a pause in
    it, found by the fixture's audio in an utterance: normalized cross-correlation of the fixture's voiced part with
    the utterance, both at 4 kHz (a sixteenth of the work: 2-45 ms an utterance). Each fixture and half scored
    against itself, among all 48: 0.75 finds the words of every one (the second half of zh_paused_0 is zh_question_0's
    speech, and is heard with its question mark)."""

    MATCH = 0.75

    def __init__(self, folder: str):
        self.fixtures = []  # (words, voiced audio at 4 kHz, its norm)
        with open(os.path.join(folder, "fixtures.json"), encoding="utf-8") as f:
            listed = json.load(f)
        for item in listed:
            audio, rate = sf.read(os.path.join(folder, item["file"]), dtype="float32")
            self.add("" if item["kind"] == "noise" else item["text"], audio)
            if item["kind"] == "paused":  # "before ... after", the pause at pause_at_s
                before, after = item["text"].split(" ... ")
                self.add(before, audio[:round(item["pause_at_s"] * rate)])
                self.add(after, audio[round((item["pause_at_s"] + item["pause_ms"] / 1000) * rate):])

    def add(self, words: str, audio: np.ndarray) -> None:
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        voiced = resample_poly(audio[loud[0]:loud[-1] + 1], 1, 4)
        self.fixtures.append((words, voiced, float(np.linalg.norm(voiced))))

    def words(self, audio: np.ndarray) -> Optional[str]:
        """The words of the longest fixture in `audio` (a question with a pause holds the question), or None."""
        audio = resample_poly(audio, 1, 4)
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        spoken = loud[-1] + 1 - loud[0] if len(loud) else 0
        energy = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
        found = []
        for words, voiced, norm in self.fixtures:
            n = len(voiced)
            if not 0.7 * spoken <= n <= len(audio):  # it must be most of what was said (a knock matches anywhere)
                continue
            window = np.sqrt(np.maximum(energy[n:] - energy[:-n], 1e-12))  # the utterance's norm at each offset
            if np.max(correlate(audio, voiced, mode="valid", method="fft") / (window * norm)) >= self.MATCH:
                found.append((n, words))
        return max(found)[1] if found else None


def stall(what: str, seconds: float) -> None:
    logger.info("test fault: stalling %g s on %s", seconds, what)
    time.sleep(seconds)


class FixedLatencyASR(s2s.ASRHandler):
    name = "fixed"

    def __init__(self, latency_s: float, fail_over_s: Optional[float] = None, stall_over_s: Optional[float] = None,
                 stall_s: float = 0.0, load_s: float = 0.0, short_s: float = 0.0, short_words: str = "",
                 transcripts: str = ""):
        self.latency_s, self.load_s = latency_s, load_s
        self.short_s, self.short_words = short_s, short_words
        self.transcripts = FixtureTranscripts(transcripts) if transcripts else None
        self.fail_over_s, self.stall_over_s, self.stall_s = fail_over_s, stall_over_s, stall_s

    @classmethod
    def add_args(cls, group):
        group.add_argument("--asr_latency_ms", type=float, default=50, help="--asr fixed: its latency")
        group.add_argument("--asr_load_s", type=float, default=0, help="--asr fixed: how long it takes to load")
        group.add_argument("--asr_fail_over_s", type=float, default=None, help="--asr fixed: raise on an utterance longer than this")
        group.add_argument("--asr_stall_over_s", type=float, default=None,
                           help="--asr fixed: take --stall_s longer on an utterance longer than this")
        group.add_argument("--asr_short_s", type=float, default=0.0,
                           help="--asr fixed: an utterance shorter than this is heard as --asr_short_words")
        group.add_argument("--asr_short_words", default="", help="--asr fixed: what it hears in a short utterance")
        group.add_argument("--asr_transcripts", default="",
                           help="--asr fixed: a folder of speech fixtures (fixtures.json): it hears the words of the one it is given")

    @classmethod
    def from_args(cls, args):
        return cls(args.asr_latency_ms / 1000, args.asr_fail_over_s, args.asr_stall_over_s, args.stall_s, args.asr_load_s,
                   args.asr_short_s, args.asr_short_words, args.asr_transcripts)

    def setup(self):
        time.sleep(self.load_s)  # stands in for loading weights

    def transcribe(self, audio):
        seconds = len(audio) / s2s.SAMPLE_RATE
        if self.fail_over_s is not None and seconds > self.fail_over_s:
            raise RuntimeError(f"test fault: the ASR broke on {seconds:.1f} s of speech")
        if self.stall_over_s is not None and seconds > self.stall_over_s:
            stall(f"{seconds:.1f} s of speech in the ASR", self.stall_s)
        started = time.monotonic()
        words = self.transcripts.words(audio) if self.transcripts is not None else None
        time.sleep(max(0.0, self.latency_s - (time.monotonic() - started)))  # stands in for model compute
        if words is not None:
            return words
        return self.short_words if seconds < self.short_s else f"heard {seconds:.1f} seconds"


class FixedLatencyTTS(s2s.TTSHandler):
    """First audio of a chunk after a fixed latency, then the rest in 200 ms pieces at a fixed real-time factor;
    a 220 Hz tone lasting a fixed time per character, like speech at about 15 characters a second."""

    name = "fixed"
    PIECE = s2s.SAMPLE_RATE // 5  # samples: 200 ms

    def __init__(self, latency_s: float, rtf: float, s_per_char: float = 0.065, fail_on: str = "",
                 stall_on: str = "", stall_s: float = 0.0):
        self.latency_s, self.rtf, self.s_per_char = latency_s, rtf, s_per_char
        self.fail_on, self.stall_on, self.stall_s = fail_on, stall_on, stall_s

    @classmethod
    def add_args(cls, group):
        group.add_argument("--tts_latency_ms", type=float, default=100, help="--tts fixed: time to its first audio")
        group.add_argument("--tts_rtf", type=float, default=0.1, help="--tts fixed: its real-time factor after its first audio")
        group.add_argument("--tts_fail_on", default="", help="--tts fixed: raise on a chunk of text containing this")
        group.add_argument("--tts_stall_on", default="", help="--tts fixed: take --stall_s longer on a chunk of text containing this")

    @classmethod
    def from_args(cls, args):
        return cls(args.tts_latency_ms / 1000, args.tts_rtf, fail_on=args.tts_fail_on, stall_on=args.tts_stall_on,
                   stall_s=args.stall_s)

    def synthesize(self, text, voice=None):
        if self.fail_on and self.fail_on in text:
            raise RuntimeError(f"test fault: the TTS broke on {text!r}")
        if self.stall_on and self.stall_on in text:
            stall(f"{text!r} in the TTS", self.stall_s)
        n = int(s2s.speech_length(text) * self.s_per_char * s2s.SAMPLE_RATE)
        audio = 0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / s2s.SAMPLE_RATE).astype(np.float32)
        time.sleep(self.latency_s)  # stands in for model compute up to the first audio
        for i in range(0, n, self.PIECE):
            if i:
                time.sleep(self.PIECE / s2s.SAMPLE_RATE * self.rtf)
            yield audio[i:i + self.PIECE]


def build_parser():
    """The server's flags, with the fixed ASR and TTS among its choices (each declares its own flags)."""
    s2s.ASR_HANDLERS["fixed"] = FixedLatencyASR
    s2s.TTS_HANDLERS["fixed"] = FixedLatencyTTS
    parser = s2s.build_parser()
    parser.add_argument("--stall_s", type=float, default=3.0, help="how long a stall of the fixed ASR or TTS lasts")
    parser.add_argument("--transformers_version", default=None,
                        help="the version transformers reports, as in CosyVoice's own environment (for the CosyVoice stand-in)")
    return parser


if __name__ == "__main__":
    parser = build_parser()
    pretend = parser.parse_known_args()[0].transformers_version
    if pretend:
        import transformers
        transformers.__version__ = pretend
    s2s.main(parser=parser)
