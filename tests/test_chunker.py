"""Cutting an LLM token stream into speakable chunks: Chinese, English and mixed."""
import s2s_server_pipeline as s2s


def chunks(text, step=3, first_min_chars=6):
    """Feed `text` a few characters at a time, as tokens arrive."""
    c = s2s.SpeakableChunker(first_min_chars)
    out = []
    for i in range(0, len(text), step):
        out += c.push(text[i:i + step])
    rest = c.flush()
    return out + ([rest] if rest else [])


def test_english_sentences_with_short_first_chunk():
    out = chunks("Well, honestly, I think so. The weather is fine today! Is it raining? No.")
    assert out == ["Well, honestly,", " I think so.", " The weather is fine today!", " Is it raining?", " No."]


def test_sentence_mode_waits_for_the_first_sentence_end():
    out = chunks("Well, honestly, I think so. The weather is fine, today!", first_min_chars=None)
    assert out == ["Well, honestly, I think so.", " The weather is fine, today!"]


def test_chinese_sentences():
    out = chunks("你好，今天天气很好。我们去公园吧！好不好？")
    assert out == ["你好，今天天气很好。", "我们去公园吧！", "好不好？"]


def test_chinese_first_chunk_cut_at_comma_once_long_enough():
    out = chunks("当然可以，我来给你详细介绍一下这个问题。首先")
    assert out[0] == "当然可以，" and out[1] == "我来给你详细介绍一下这个问题。" and out[2] == "首先"


def test_mixed_chinese_english():
    out = chunks("我喜欢用Python写代码。It is fun, really. 你呢？")
    assert out == ["我喜欢用Python写代码。", "It is fun, really.", " 你呢？"]


def test_numbers_and_abbreviations_do_not_split():
    out = chunks("Pi is about 3.14 and e is 2.71 today. Done.", step=1)
    assert out == ["Pi is about 3.14 and e is 2.71 today.", " Done."]


def test_nothing_is_lost_and_punctuation_only_pieces_stay_attached():
    text = "Hi!!! ... What?! 真的吗？？ OK."
    out = chunks(text, step=1)
    assert "".join(out) == text
    assert all(s2s.SPEAKABLE.search(c) for c in out)


def test_long_sentence_without_period_is_cut_at_a_comma():
    text = ("this goes on and on, " * 10) + "end"
    out = chunks(text, step=5)
    assert len(out) >= 2 and all(len(c) <= s2s.MAX_CHUNK_CHARS + 25 for c in out[:-1])
    assert "".join(out) == text


def test_first_chunk_flag_reaches_the_llm_handler():
    for flag, expected in (("clause", 6), ("sentence", None)):
        args = s2s.parse_args(["--llm", "echo", "--first_chunk", flag, "--client_dir", ""])
        assert s2s.EchoLLMHandler.from_args(args).first_chunk_min_chars == expected
