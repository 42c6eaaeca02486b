"""The real server, with an ASR and a TTS of fixed latency that need no model weights (for end-to-end tests
and benchmarks). The ASR reports how much speech it heard, so a test can tell which utterance reached it.

    python tests/serve_test_models.py --asr fixed --asr_latency_ms 50 --llm openai --lm_model_url ... --tts fixed
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2s_server_pipeline as s2s  # noqa: E402


class FixedLatencyASR(s2s.ASRHandler):
    name = "fixed"

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    @classmethod
    def from_args(cls, args):
        return cls(args.asr_latency_ms / 1000)

    def transcribe(self, audio):
        time.sleep(self.latency_s)  # stands in for model compute
        return f"heard {len(audio) / s2s.SAMPLE_RATE:.1f} seconds"


class FixedLatencyTTS(s2s.TTSHandler):
    """First audio of a chunk after a fixed latency, then the rest in 200 ms pieces at a fixed real-time factor;
    a 220 Hz tone lasting a fixed time per character, like speech at about 15 characters a second."""

    name = "fixed"
    PIECE = s2s.SAMPLE_RATE // 5  # samples: 200 ms

    def __init__(self, latency_s: float, rtf: float, s_per_char: float = 0.065):
        self.latency_s, self.rtf, self.s_per_char = latency_s, rtf, s_per_char

    @classmethod
    def from_args(cls, args):
        return cls(args.tts_latency_ms / 1000, args.tts_rtf)

    def synthesize(self, text, voice=None):
        n = int(s2s.speech_length(text) * self.s_per_char * s2s.SAMPLE_RATE)
        audio = 0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / s2s.SAMPLE_RATE).astype(np.float32)
        time.sleep(self.latency_s)  # stands in for model compute up to the first audio
        for i in range(0, n, self.PIECE):
            if i:
                time.sleep(self.PIECE / s2s.SAMPLE_RATE * self.rtf)
            yield audio[i:i + self.PIECE]


s2s.ASR_HANDLERS["fixed"] = FixedLatencyASR
s2s.TTS_HANDLERS["fixed"] = FixedLatencyTTS


def build_parser():
    parser = s2s.build_parser()
    parser.add_argument("--asr_latency_ms", type=float, default=50, help="latency of the fixed ASR")
    parser.add_argument("--tts_latency_ms", type=float, default=100, help="time to the first audio of the fixed TTS")
    parser.add_argument("--tts_rtf", type=float, default=0.1, help="real-time factor of the fixed TTS after its first audio")
    return parser


if __name__ == "__main__":
    s2s.main(parser=build_parser())
