"""Model directories with random weights of a real model's architecture and size, built offline.

A model's compute cost does not depend on its weight values, so these stand in for the real SenseVoiceSmall and
Qwen2.5 Instruct models when their weights cannot be downloaded: every matrix has the real shape, the vocabularies
have the real size (the output layer is a real part of the per-token cost), and the directories load through the
same library code paths (funasr's AutoModel, transformers' from_pretrained) as the real ones. What they say is
meaningless but well formed: SenseVoice decodes to text pieces, and the LLM writes speakable made-up words with
commas and full stops, so the server cuts its answers into chunks as it would a real answer.

    from random_weights import build_sensevoice_small_random, build_qwen_random
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import s2s_server_pipeline as s2s  # noqa: E402

# SenseVoiceSmall (iic/SenseVoiceSmall on ModelScope, FunAudioLLM/SenseVoiceSmall on Hugging Face): the encoder
# dimensions are those of the model's published config.yaml, also printed in FunASR's docs/tutorial/Tables.md
# (SenseVoiceEncoderSmall: output_size 512, attention_heads 4, linear_units 2048, num_blocks 50, tp_blocks 20,
# kernel_size 11; WavFrontend: 80 mel bins, LFR m=7 n=6, which tests/tiny_funasr.py always uses). The vocabulary
# is the 25055 pieces of its chn_jpn_yue_eng_ko_spectok.bpe.model. Built so: ~234 M parameters, a 936 MB model.pt,
# as the real one.
SENSEVOICE_SMALL = dict(d_model=512, attention_heads=4, linear_units=2048, num_blocks=50, tp_blocks=20,
                        vocab_size=25055, fill_vocab=True)
SPEECH_TOKENS_PER_S = 4.0  # about what SenseVoice writes for speech: transcripts, and so LLM prompts, of a real length

# Qwen2.5 Instruct models, by hub id: the config.json of each on the Hugging Face hub (both tie their embeddings and
# share one vocabulary). ~494 M and ~1544 M parameters.
QWEN25 = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2),
}
QWEN25_SHARED = dict(vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, hidden_act="silu")

# The English the tokenizer learns merges for: the server's system prompt, and the question bench/real_models.py asks
# the LLM alone. Other English is spelled out in smaller pieces than Qwen's tokenizer would use.
QUESTION = "What is the weather like in Paris today, and should I take an umbrella?"

# Qwen's special tokens; they take the last ids here.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Made-up words the random LLM speaks: syllables espeak-ng reads as English. One in BREAK_EVERY carries a comma and
# one in BREAK_EVERY a full stop, so a random answer has a break every ~6 words, where the server cuts chunks.
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
BREAK_EVERY = 12
# The embeddings are tied, so a token's embedding row is also its output row. All rows but the made-up words' are
# shrunk by this factor: their logits stay far below the 20 best words', so top-k sampling picks only words; their
# input vectors stay nonzero (with all-zero inputs every hidden state, and so every logit, would be zero).
OTHER_TOKENS_SCALE = 0.1
# Sampling as in Qwen2.5-0.5B-Instruct's generation_config.json; the server's generate() call takes these over, and
# top-k / top-p filtering is part of the real per-token cost.
QWEN_SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)


def atomic_build(dest_dir: str, build) -> str:
    """Run build(tmp_dir) and move the result to dest_dir, so an interrupted build never leaves a model that looks
    complete. Returns dest_dir."""
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        os.replace(tmp, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def build_sensevoice_small_random(dest_dir: str) -> str:
    """SenseVoiceSmall's architecture and size with random weights (tests/tiny_funasr.py at the real dimensions)."""
    from tiny_funasr import build_sensevoice_small
    return atomic_build(dest_dir, lambda d: build_sensevoice_small(d, **SENSEVOICE_SMALL,
                                                                   text_tokens_per_second=SPEECH_TOKENS_PER_S))


# ------------------------------------------------------------------------------------------------
# Qwen2.5-0.5B-Instruct
# ------------------------------------------------------------------------------------------------

def cjk_characters() -> list:
    """CJK Unified Ideographs: each becomes one token, as common characters are in Qwen's vocabulary, so a Chinese
    (or random SenseVoice) transcript costs the LLM about as many prompt tokens as with the real tokenizer."""
    return [chr(c) for c in range(0x4E00, 0xA000)]


def made_up_words(n: int, seed: int = 0) -> list:
    """n distinct words of one to three syllables in random order, one in six with a trailing comma or full stop
    (see BREAK_EVERY)."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words = ["".join(p) for k in (1, 2, 3) for p in itertools.product(syllables, repeat=k)]
    random.Random(seed).shuffle(words)
    words = words[:n]
    for i in range(0, n, BREAK_EVERY):
        words[i] += ","
        if i + BREAK_EVERY // 2 < n:
            words[i + BREAK_EVERY // 2] += "."
    return words


def train_base_tokenizer():
    """Byte-level BPE with merges for the system prompt's English and for every CJK character: prompts tokenize to
    about as many tokens as with Qwen's own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    english = [s2s.DEFAULT_SYSTEM_PROMPT, QUESTION]
    trainer = trainers.BpeTrainer(vocab_size=QWEN25_SHARED["vocab_size"], min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english + cjk_characters(), trainer=trainer)  # one character per item: no merge across two
    return tok


def qwen_sized_tokenizer():
    """A fast tokenizer of exactly Qwen's vocabulary size, and the ids of its made-up words: the trained BPE, then
    the made-up words as added tokens (so the server's history, which holds earlier answers as text, encodes back to
    one token a word, as a real answer does), then Qwen's three chat special tokens as the last ids. Every id the model
    can emit decodes to text."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    tok = train_base_tokenizer()
    known = tok.get_vocab()
    specials = [ENDOFTEXT, IM_START, IM_END]
    n_words = QWEN25_SHARED["vocab_size"] - len(specials) - len(known)
    spare = len(known)  # more words than needed: those the trained BPE already has (" so", " be") are left out
    words = [" " + w for w in made_up_words(n_words + spare) if "Ġ" + w not in known][:n_words]  # Ġ: BPE's space
    tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size(with_added_tokens=True) == QWEN25_SHARED["vocab_size"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   extra_special_tokens=[IM_START], chat_template=CHATML, model_max_length=32768,
                                   clean_up_tokenization_spaces=False)
    return fast, [tok.token_to_id(w) for w in words]


def build_qwen_random(dest_dir: str, seed: int = 0, model_id: str = "Qwen/Qwen2.5-0.5B-Instruct") -> str:
    """A Qwen2.5 Instruct model's (a key of QWEN25) architecture and size with random weights, saved in bfloat16 as
    the real one is."""
    return atomic_build(dest_dir, lambda d: _write_qwen(d, seed, QWEN25[model_id]))


def _write_qwen(dest_dir: str, seed: int, sizes: dict) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging
    tokenizer, word_ids = qwen_sized_tokenizer()
    config = Qwen2Config(**sizes, **QWEN25_SHARED, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    others = torch.ones(config.vocab_size, dtype=torch.bool)
    others[torch.tensor(word_ids)] = False
    with torch.no_grad():
        model.get_input_embeddings().weight[others] *= OTHER_TOKENS_SCALE
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               **QWEN_SAMPLING)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the benchmark's output
    try:
        model.to(torch.bfloat16).save_pretrained(dest_dir)
        tokenizer.save_pretrained(dest_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
