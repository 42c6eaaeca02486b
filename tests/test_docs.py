"""The README, --help, the protocol document and the code agree."""
import os
import re
import subprocess
import sys

from conftest import ROOT

import s2s_server_pipeline as s2s

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import readme_help  # noqa: E402


def read(*parts):
    return open(os.path.join(ROOT, *parts), encoding="utf-8").read()


def test_readme_flags_are_the_help_output():
    assert readme_help.help_block() in read("README.md"), "run: python scripts/readme_help.py"


def test_every_event_and_error_code_is_documented():
    doc = read("docs", "protocol.md")
    for cls in s2s.ServerEvent.__subclasses__():
        if cls.extended:
            assert f"`{cls.event}`" in doc, cls.event
    code = read("s2s_server_pipeline.py")
    start, end = code.index("# The OpenAI Realtime protocol"), code.index("# The network shell")
    for err in set(re.findall(r'BadMessage\("(\w+)"', code[:start] + code[end:])) - {"server_full", "uid_in_use"}:
        assert f"`{err}`" in doc, err
    for stage in ("asr", "llm", "tts"):
        assert f"`{stage}_failed`" in doc


def test_every_realtime_event_and_error_code_is_documented():
    """docs/realtime.md names every client event the endpoint takes, every server event it sends, every error code."""
    doc = read("docs", "realtime.md")
    code = read("s2s_server_pipeline.py")
    adapter = code[code.index("# The OpenAI Realtime protocol"):code.index("# The network shell")]
    client_events = re.findall(r'"([a-z_]+(?:\.[a-z_]+)+)": self\.\w+', adapter)
    server_events = re.findall(r'"type": "([a-z_]+(?:\.[a-z_]+)+)"', adapter) + re.findall(r'kind = "([a-z_.]+)" if', adapter)
    assert len(client_events) >= 10 and len(server_events) >= 25
    for event in client_events + server_events:
        name = event.split(".")[-1]
        assert f"`{event}`" in doc or f"`.{name}`" in doc or f"/ `.{name}`" in doc, event
    for err in set(re.findall(r'BadMessage\("(\w+)"', adapter)):
        assert f"`{err}`" in doc, err


def test_readme_test_command_is_what_ci_runs():
    assert "./scripts/test.sh" in read("README.md") and "scripts/test.sh" in read(".ci", "run")


def test_help_is_fast_and_import_has_no_side_effects():
    # --help loads no model library (what would make it slow; a timing would only measure the machine's load).
    help_probe = ("import runpy, sys; sys.argv = ['s2s_server_pipeline.py', '--help']\n"
                  "try:\n    runpy.run_path('s2s_server_pipeline.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                  "heavy = {'torch', 'funasr', 'transformers', 'onnxruntime', 'openai'} & set(sys.modules)\n"
                  "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", help_probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--min_silence_ms" in out.stdout
    probe = ("import logging, os, sys; before = dict(os.environ); import s2s_server_pipeline; "
             "assert dict(os.environ) == before; assert not logging.getLogger().handlers; "
             "assert 'torch' not in sys.modules and 'funasr' not in sys.modules and 'openai' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)


def test_cleans2s_launch_flags_are_accepted():
    args = s2s.parse_args(["--recv_host", "0.0.0.0", "--recv_port", "9001", "--send_host", "0.0.0.0",
                           "--send_port", "9002", "--stt_model_name", "paraformer-zh", "--enable_llm_api",
                           "--lm_model_name", "deepseek-chat", "--lm_model_url", "https://api.deepseek.com",
                           "--tts_model_name", "/models/CosyVoice-300M", "--ref_dir", "ref_audio",
                           "--enable_interruption", "--min_silence_ms", "1200", "--vad_thresh", "0.3",
                           "--chunk_size", "2048", "--save_data", "--chat_size", "1", "--max_new_tokens", "160",
                           "--init_chat_role", "system", "--init_chat_prompt", "Be nice.", "--device", "cuda",
                           "--stt_dtype", "float16", "--lm_dtype", "bfloat16", "--tts_dtype", "float32",
                           "--sample_rate", "16000", "--min_speech_ms", "400"])
    assert args.llm == "openai" and args.enable_interruption and args.save_data == "s2s_data"
    assert args.min_silence_ms == 1200 and args.vad_thresh == 0.3 and args.chat_size == 1
    # CleanS2S's names for what this server calls --asr_model_name, --asr_dtype and --lm_max_new_tokens
    assert (args.asr_model_name, args.asr_dtype, args.lm_max_new_tokens) == ("paraformer-zh", "float16", 160)


def test_cleans2s_defaults_pick_the_same_backends():
    assert s2s.parse_args([]).tts == "espeak"  # the LLM without flags: tests/test_transformers_llm.py
    local = s2s.parse_args(["--lm_model_name", "/models/Qwen2.5-7B-Instruct"])  # CleanS2S without --enable_llm_api
    assert local.llm == "transformers" and local.lm_model_name == "/models/Qwen2.5-7B-Instruct"
    api = s2s.parse_args(["--lm_model_url", "https://api.deepseek.com"])
    assert api.llm == "openai" and api.lm_model_name == "gpt-4o-mini"
