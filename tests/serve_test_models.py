"""The real server, with an ASR of fixed latency that needs no model weights (for end-to-end tests and
benchmarks). It reports how much speech it heard, so a test can tell which utterance reached it.

    python tests/serve_test_models.py --asr fixed --asr_latency_ms 50 --llm openai --lm_model_url ...
"""
import os
import sys
import time

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


s2s.ASR_HANDLERS["fixed"] = FixedLatencyASR

if __name__ == "__main__":
    parser = s2s.build_parser()
    parser.add_argument("--asr_latency_ms", type=float, default=50, help="latency of the fixed ASR")
    s2s.main(parser=parser)
