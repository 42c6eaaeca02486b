"""The FunASR handler through funasr's real AutoModel code path, on tiny random-weight models built here."""
import numpy as np
import pytest

from client import load_wav
from conftest import fixture
from tiny_funasr import build_paraformer, build_sensevoice_small

import s2s_server_pipeline as s2s


@pytest.mark.parametrize("build", [build_sensevoice_small, build_paraformer])
def test_funasr_handler_loads_and_transcribes(tmp_path, build):
    model_dir = build(str(tmp_path / build.__name__))
    h = s2s.FunASRHandler(model_dir, "cpu", "auto")
    h.setup()
    h.warmup()
    text = h.transcribe(load_wav(fixture("en_question.wav")))
    assert isinstance(text, str) and text  # random weights: some text, meaningless
    assert "<|" not in text  # SenseVoice's language / emotion / event tags are stripped
    assert h.is_sensevoice == (build is build_sensevoice_small)


def test_wrong_model_path_fails_at_start_up_with_one_sentence(tmp_path):
    h = s2s.FunASRHandler(str(tmp_path / "missing"), "cpu", "auto")
    with pytest.raises(SystemExit, match="no FunASR model there"):
        h.setup()
