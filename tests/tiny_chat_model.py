"""Build a tiny, random-weight Llama chat model + fast tokenizer, fully offline.

Intended for tests: the result loads with ``AutoTokenizer.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)`` (no hub access needed), has a Jinja
chat template, and generates visible (if meaningless) text on CPU in milliseconds.

    from tiny_chat_model import build_tiny_chat_model
    path = build_tiny_chat_model(tmp_path / "tiny")

What gets written to ``dest_dir`` (about 0.7 MB in total):
    config.json, generation_config.json, model.safetensors       (the model)
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (the tokenizer)

Design notes
------------
* Tokenizer: byte-level BPE (GPT-2 / Llama-3 / Qwen style) trained with the
  ``tokenizers`` library on a few lines of English + Chinese.  Every one of the 256
  bytes is in the base alphabet, so *any* input text encodes losslessly (no <unk>).
* Special tokens: ``<pad>`` (0), ``<s>`` (1, bos), ``<|im_start|>`` (2) and
  ``<|im_end|>`` (3, eos).  The chat format is ChatML-like::

      <s><|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n

  ``<|im_end|>`` doubles as eos, so a (trained) model would stop at the end of its turn.
* Plain ``tokenizer(text)`` prepends ``<s>`` (like Llama); ``apply_chat_template``
  tokenizes with ``add_special_tokens=False`` and the template writes ``<s>`` itself,
  so there is exactly one bos either way.
* Model: ``LlamaForCausalLM`` with hidden 64, 2 layers, 4 heads (2 KV heads), untied
  lm_head, random init from ``seed`` (~0.17 M parameters).  A purely random model emits
  byte fragments, control characters and special tokens, so we edit the (untied) lm_head:
  rows of "word-like" tokens (" word", CJK text, punctuation - ~190 of 752) are scaled up
  (logit std ~4) and all other rows, including eos and the other special tokens, are zeroed
  (logit exactly 0, below the best word logit at every step in practice).  Result: greedy
  output is a deterministic stream of words, seeded sampling stays >98 % on words, and
  ``TextIteratorStreamer`` yields about one piece per token.  Consequence: this model does
  not end its turn by itself (p(eos) ~1e-5 per sampled step, in practice never greedily) -
  generation runs to ``max_new_tokens`` or until a stopping criterion fires, which is
  exactly what stop/cancel tests need.
"""

from __future__ import annotations

import os

# Chat template (Jinja).  Roles are restricted to system/user/assistant; content may be a
# plain string or an OpenAI-style list of parts ({"type": "text", "text": ...}).  The "\\n"
# below reaches Jinja as the escape \n inside a string literal, i.e. a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PAD, BOS, IM_START, IM_END = "<pad>", "<s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]  # ids 0..3, in this order

# A few lines of English and Chinese to learn BPE merges from.
_CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question briefly and clearly.",
    "What is the weather like in Beijing and Shanghai this week?",
    "Please write a short poem about the sea, the moon and the stars.",
    "Machine learning models learn patterns from data.",
    "This is a tiny test model; its answers are random words.",
    "Can you help me translate this sentence into Chinese?",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "The system message tells the assistant how to behave.",
    "user: tell me a story. assistant: once upon a time there was a small robot.",
    "你好！今天天气怎么样？我很好，谢谢。",
    "你是一个乐于助人的助手。请简短地回答问题。",
    "北京和上海是中国的大城市。",
    "机器学习模型从数据中学习规律。",
    "请把这句话翻译成英文。",
    "从前有一个小机器人，它喜欢唱歌和写诗。",
    "一二三四五六七八九十。",
]

VOCAB_SIZE = 1000  # upper bound; this corpus runs out of merges at 752 tokens (256 bytes + 4 special + merges)


def _build_tokenizer():
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())  # no unk_token needed: every byte is in the alphabet
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)

    bos_id = tok.token_to_id(BOS)
    # Plain tokenizer(text) -> "<s> text" (Llama-style).  ByteLevel(trim_offsets=False) first keeps
    # offsets consistent; TemplateProcessing adds bos.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START],  # v5 name (additional_special_tokens is deprecated)
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,
    )


_PUNCTUATION = set(",.!?;:，。！？；：")
# lm_head rows of word-like tokens are scaled so their logits have std ~4 (a "confident" model:
# under sampling, >98% of the probability mass stays on word-like tokens, eos gets ~1e-5).
_LM_HEAD_SCALE = 25.0


def _is_cjk(char: str) -> bool:
    return 0x4E00 <= ord(char) <= 0x9FFF  # CJK Unified Ideographs (what TextStreamer flushes on)


def _word_like_token_ids(tokenizer) -> list[int]:
    """Ids of tokens that read as text on their own: " word", CJK characters, or punctuation.

    Excluded: special tokens, single bytes that are partial UTF-8 or control characters, and
    word-internal pieces without a leading space ("ing").  Word-like output also streams nicely:
    TextIteratorStreamer releases text at spaces / CJK characters, so it yields ~one piece per token.
    """
    special = set(tokenizer.all_special_ids)
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id in special or not text or "\ufffd" in text or not text.isprintable():
            continue
        if (text.startswith(" ") and text.strip()) or all(map(_is_cjk, text)) or text in _PUNCTUATION:
            ids.append(token_id)
    return ids


def build_tiny_chat_model(dest_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random Llama chat model + tokenizer to ``dest_dir`` and return its path.

    Deterministic for a given ``seed`` (the global torch RNG state is left untouched).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    dest_dir = os.fspath(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)

    tokenizer = _build_tokenizer()
    vocab_size = len(tokenizer)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,  # untied, so we can edit lm_head rows without touching inputs
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()

    # Make the random model "speak" in word-like tokens (see module docstring): every other
    # token (incl. eos and the other special tokens) gets a zero lm_head row, i.e. logit 0, which
    # in practice is always below the best of the ~190 scaled random word logits (std ~4).
    word_like = torch.zeros(vocab_size, dtype=torch.bool)
    word_like[_word_like_token_ids(tokenizer)] = True
    with torch.no_grad():
        model.lm_head.weight[~word_like] = 0.0
        model.lm_head.weight[word_like] *= _LM_HEAD_SCALE

    # Explicit generation defaults, so generate() doesn't have to guess (and warn about) them.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=20,
    )

    # Save without the "Writing model shards" progress bar (restore the caller's setting after).
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(dest_dir)
        tokenizer.save_pretrained(dest_dir)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    return dest_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_chat_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-chat-model"))
