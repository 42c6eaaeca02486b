"""Build tiny, random-weight FunASR model directories for offline tests.

The directories produced here look like (much smaller) copies of the ModelScope
repositories ``iic/SenseVoiceSmall``,
``iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch`` and
its ``-online`` streaming sibling, so that::

    from funasr import AutoModel
    model = AutoModel(model=build_paraformer(tmp_dir), disable_update=True, device="cpu")
    model.generate(input=np.zeros(16000, dtype=np.float32))

runs FunASR's real code path (config parsing, tokenizer, WavFrontend fbank +
LFR + CMVN, encoder/decoder, decoding and post-processing) without any network
access.  The recognised text is meaningless, but it has the right *shape*:

* SenseVoiceSmall: ``"<|en|><|NEUTRAL|><|Speech|><|woitn|>..."`` -- the four
  leading rich-transcription tags are wired in deterministically (language
  follows ``language=``, ``<|withitn|>``/``<|woitn|>`` follows ``use_itn=``),
  followed by random sentencepiece text.  ``rich_transcription_postprocess``
  therefore behaves as it would on real output.
* Paraformer / ParaformerStreaming: random Chinese characters and English words
  from a small character vocabulary; the CIF predictor is biased so that it
  emits roughly four tokens per second of audio regardless of the input, so
  the text is never empty for inputs of ~0.2 s or more.

Everything is deterministic for a given ``seed`` (the frontend's ``dither`` is
0, and the global torch RNG of the caller is left untouched).  Each model
directory is about 1 MB; building one takes well under 0.1 s once ``funasr``
is imported (``import funasr`` itself takes ~5 s because it imports all of its
sub-modules).

Only ``funasr``, ``torch``, ``numpy``, ``sentencepiece`` and ``PyYAML`` (a
dependency of omegaconf, which funasr needs) are used.  Feature extraction
goes through ``funasr.utils.fbank``, which falls back to kaldi-native-fbank
when torchaudio is not installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from typing import Dict, Iterable, List, Optional

import torch
import yaml

__all__ = [
    "build_sensevoice_small",
    "build_paraformer",
    "SENSEVOICE_SPECIAL_TOKENS",
]

# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------

SAMPLE_RATE = 16000
N_MELS = 80
LFR_M = 7
LFR_N = 6
FEAT_DIM = N_MELS * LFR_M  # 560: the model input after low-frame-rate stacking

# Frontend configuration shared by every model here (same values as the real
# models).  ``dither`` is set to 0 (real configs leave it at the default 1.0) so
# that identical audio always gives identical features and therefore identical
# text; ``cmvn_file`` is filled in by funasr from configuration.json.
_FRONTEND_CONF = {
    "fs": SAMPLE_RATE,
    "window": "hamming",
    "n_mels": N_MELS,
    "frame_length": 25,
    "frame_shift": 10,
    "lfr_m": LFR_M,
    "lfr_n": LFR_N,
    "dither": 0.0,
}

# A small pool of "words" used both as Paraformer characters and as training
# text for the SenseVoice sentencepiece model.
_CJK_CHARS = list(
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动"
    "同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二"
    "理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社"
    "义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没"
)
_ENGLISH_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people "
    "hello world test speech model audio server stream chunk result text voice"
).split()


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch for the duration of a build without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _mkdir(dest_dir: str) -> str:
    dest_dir = os.path.abspath(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    return dest_dir


def _write_yaml(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, allow_unicode=True, sort_keys=False)


def _write_model_files(dest_dir: str, config: dict, model: torch.nn.Module, tokenizer_conf: dict) -> None:
    """config.yaml, am.mvn, model.pt and configuration.json: what every model directory holds."""
    _write_yaml(os.path.join(dest_dir, "config.yaml"), config)
    _write_am_mvn(os.path.join(dest_dir, "am.mvn"))
    _save_state_dict(model, os.path.join(dest_dir, "model.pt"))
    _write_configuration_json(
        dest_dir,
        {
            "init_param": "model.pt",
            "config": "config.yaml",
            "tokenizer_conf": tokenizer_conf,
            "frontend_conf": {"cmvn_file": "am.mvn"},
        },
    )


def _write_configuration_json(dest_dir: str, file_path_metas: dict) -> None:
    """Write the ModelScope-style ``configuration.json``.

    When a model directory contains this file, funasr's
    ``download_model_from_hub.download_from_ms`` (and ``download_from_hf``)
    resolve every path listed in ``file_path_metas`` relative to the
    directory, so the directory can be moved around freely and no absolute
    paths end up in ``config.yaml``.
    """
    conf = {
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "file_path_metas": file_path_metas,
    }
    with open(os.path.join(dest_dir, "configuration.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)


def _write_am_mvn(path: str, dim: int = FEAT_DIM) -> None:
    """Write a global CMVN file in the Kaldi nnet1 text format funasr expects.

    ``funasr.frontends.wav_frontend.load_cmvn`` reads the numbers between
    ``[`` and ``]`` on the ``<LearnRateCoef>`` lines following ``<AddShift>``
    (added to the features, i.e. minus the mean) and ``<Rescale>`` (multiplied,
    i.e. 1/stddev).  The values are rough constants of the right magnitude for
    log-mel features of int16-scaled audio.
    """
    shift = " ".join(["-12.0"] * dim)
    scale = " ".join(["0.25"] * dim)
    with open(path, "w", encoding="utf-8") as f:
        f.write("<Nnet>\n")
        f.write(f"<Splice> {dim} {dim}\n[ 0 ]\n")
        f.write(f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n")
        f.write(f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n")
        f.write("</Nnet>\n")


def _instantiate(config: dict, vocab_size: int) -> torch.nn.Module:
    """Construct the model exactly as ``AutoModel.build_model`` would.

    ``build_model`` flattens ``model_conf`` together with all top-level config
    keys into the constructor kwargs and adds ``vocab_size`` (from the
    tokenizer) and ``input_size`` (from ``frontend.output_size()``).
    """
    import funasr  # noqa: F401  (importing funasr registers all model classes)
    from funasr.register import tables

    model_class = tables.model_classes.get(config["model"])
    if model_class is None:
        raise RuntimeError(f"funasr does not register model class {config['model']!r}")
    kwargs = dict(config.get("model_conf", {}))
    kwargs.update(config)
    kwargs.update(vocab_size=vocab_size, input_size=FEAT_DIM)
    model = model_class(**kwargs)
    model.eval()
    return model


def _save_state_dict(model: torch.nn.Module, path: str) -> None:
    # A bare state_dict of tensors: loads with torch.load(weights_only=True).
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path)


def _scale_(params: Iterable[torch.Tensor], factor: float) -> None:
    with torch.no_grad():
        for p in params:
            p.mul_(factor)


# ---------------------------------------------------------------------------
# SenseVoiceSmall
# ---------------------------------------------------------------------------

# Rich-transcription tags of SenseVoice.  They are added to the sentencepiece
# model as user-defined symbols, so ``DecodeIds`` emits them verbatim, exactly
# like the real ``chn_jpn_yue_eng_ko_spectok.bpe.model``.
SENSEVOICE_LANGUAGE_TAGS = ["<|zh|>", "<|en|>", "<|yue|>", "<|ja|>", "<|ko|>", "<|nospeech|>"]
SENSEVOICE_EMOTION_TAGS = [
    "<|HAPPY|>", "<|SAD|>", "<|ANGRY|>", "<|NEUTRAL|>",
    "<|FEARFUL|>", "<|DISGUSTED|>", "<|SURPRISED|>", "<|EMO_UNKNOWN|>",
]
SENSEVOICE_EVENT_TAGS = [
    "<|Speech|>", "<|BGM|>", "<|Applause|>", "<|Laughter|>", "<|Cry|>",
    "<|Sneeze|>", "<|Breath|>", "<|Cough|>", "<|Sing|>", "<|Speech_Noise|>",
    "<|Event_UNK|>",
]
SENSEVOICE_ITN_TAGS = ["<|withitn|>", "<|woitn|>"]
SENSEVOICE_SPECIAL_TOKENS = (
    SENSEVOICE_LANGUAGE_TAGS
    + SENSEVOICE_EMOTION_TAGS
    + SENSEVOICE_EVENT_TAGS
    + SENSEVOICE_ITN_TAGS
    + ["<|GBG|>"]
)

SENSEVOICE_BPE_NAME = "chn_jpn_yue_eng_ko_spectok.bpe.model"

# SenseVoiceSmall.lid_dict / textnorm_dict (funasr/models/sense_voice/model.py):
# the *query embedding index* prepended to the features for each option.
_SV_LID_INDEX = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
_SV_TEXTNORM_INDEX = {"withitn": 14, "woitn": 15}
# Positions 1 and 2 always use the fixed queries 1 and 2; the real model emits
# the emotion tag at position 1 and the event tag at position 2.
_SV_EMO_INDEX, _SV_EVENT_INDEX = 1, 2


def _sensevoice_text_corpus(seed: int, n_lines: int = 400) -> List[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 2 == 0:
            lines.append(" ".join(rng.choice(_ENGLISH_WORDS) for _ in range(rng.randint(4, 12))))
        else:
            lines.append("".join(rng.choice(_CJK_CHARS) for _ in range(rng.randint(4, 16))))
    # User-defined symbols are always kept in the vocabulary; also put them in
    # the training text so their neighbourhood looks like real output.
    lines.append(" ".join(SENSEVOICE_SPECIAL_TOKENS))
    return lines


def _train_sentencepiece(path: str, seed: int, vocab_size: int, fill_vocab: bool = False) -> None:
    """Train a tiny BPE sentencepiece model with the SenseVoice special tokens.

    Id layout mirrors the real model: 0 = ``<unk>`` (SenseVoice uses id 0 as
    the CTC blank), 1 = ``<s>``, 2 = ``</s>``, then the user-defined tags.

    The training text runs out of merges at a few thousand pieces.  With
    ``fill_vocab``, CJK characters it lacks become single pieces until there
    are exactly ``vocab_size`` (the real vocabulary, too, is mostly single
    CJK characters).
    """
    import sentencepiece as spm

    model = _sentencepiece_model(seed, vocab_size, SENSEVOICE_SPECIAL_TOKENS)
    if fill_vocab:
        learned = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        if learned < vocab_size:
            extra = _unused_cjk_chars(seed, vocab_size - learned)
            model = _sentencepiece_model(seed, vocab_size, SENSEVOICE_SPECIAL_TOKENS + extra)
    with open(path, "wb") as f:
        f.write(model)


def _unused_cjk_chars(seed: int, n: int) -> List[str]:
    """The first ``n`` CJK characters (Unified Ideographs, then Extension A) that the training text lacks."""
    used = set("".join(_sensevoice_text_corpus(seed)))
    blocks = list(range(0x4E00, 0xA000)) + list(range(0x3400, 0x4DC0))
    chars = [chr(c) for c in blocks if chr(c) not in used]
    if n > len(chars):
        raise ValueError(f"vocab_size too large: only {len(chars)} more CJK characters to add, {n} needed")
    return chars[:n]


def _sentencepiece_model(seed: int, vocab_size: int, user_symbols: List[str]) -> bytes:
    """A serialized BPE sentencepiece model trained on the SenseVoice text corpus."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sensevoice_text_corpus(seed)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        user_defined_symbols=user_symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # SenseVoice's output_timestamp=True path re-encodes the decoded text,
        # takes pieces [4:] as the text (so the 4 tags must be the first 4
        # pieces: no implicit leading "▁") and then encodes every piece on
        # its own, expecting exactly one id back (so a leading "▁" must not
        # be stripped from a piece like "▁there").
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_sensevoice_small(
    dest_dir: str,
    *,
    seed: int = 0,
    d_model: int = 64,
    attention_heads: int = 4,
    linear_units: Optional[int] = None,
    num_blocks: int = 2,
    tp_blocks: int = 1,
    vocab_size: int = 400,
    fill_vocab: bool = False,
    text_tokens_per_second: Optional[float] = None,
    auto_language: str = "en",
) -> str:
    """Build a tiny ``SenseVoiceSmall`` model directory and return its path.

    The defaults build a tiny model (~1 MB).  ``d_model``, ``attention_heads``,
    ``linear_units`` (the feed-forward width, default ``2 * d_model``),
    ``num_blocks`` and ``tp_blocks`` size the encoder; ``vocab_size`` with
    ``fill_vocab=True`` gives exactly that many pieces, and so the CTC output
    layer of that size (see ``_train_sentencepiece``).  With the real model's
    dimensions the result has its architecture and size, for benchmarks.
    ``text_tokens_per_second`` makes the text about as long as a real
    transcript (speech is ~4 tokens a second); by default nearly every audio
    frame (60 ms) emits a piece.

    Files written (same names as ``iic/SenseVoiceSmall``): ``config.yaml``,
    ``configuration.json``, ``model.pt``, ``am.mvn`` and
    ``chn_jpn_yue_eng_ko_spectok.bpe.model``.

    The weights are random, but the CTC output layer is set up so that the
    first four output frames (the language / emotion / event / text-norm query
    frames SenseVoice prepends to the features) decode to
    ``<|lang|><|NEUTRAL|><|Speech|><|woitn|>`` (``<|withitn|>`` when
    ``use_itn=True``).  ``language="auto"`` yields ``<|{auto_language}|>``.
    """
    if auto_language not in _SV_LID_INDEX or auto_language == "auto":
        raise ValueError(f"auto_language must be one of {sorted(set(_SV_LID_INDEX) - {'auto'})}")
    dest_dir = _mkdir(dest_dir)
    bpe_path = os.path.join(dest_dir, SENSEVOICE_BPE_NAME)
    _train_sentencepiece(bpe_path, seed, vocab_size, fill_vocab)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=bpe_path)
    n_vocab = sp.get_piece_size()

    config = {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {
            "output_size": d_model,
            "attention_heads": attention_heads,
            "linear_units": linear_units or 2 * d_model,
            "num_blocks": num_blocks,
            "tp_blocks": tp_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": 11,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "model": "SenseVoiceSmall",
        "model_conf": {
            "length_normalized_loss": True,
            "sos": 1,
            "eos": 2,
            "ignore_id": -1,
        },
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {
            "bpemodel": None,  # resolved by funasr from configuration.json
            "unk_symbol": "<unk>",
            "split_with_space": True,
        },
        "frontend": "WavFrontend",
        "frontend_conf": dict(_FRONTEND_CONF, cmvn_file=None),
    }

    with _seeded(seed):
        model = _instantiate(config, n_vocab)
        _shape_sensevoice_weights(model, sp, auto_language, text_tokens_per_second)

    _write_model_files(dest_dir, config, model, {"bpemodel": SENSEVOICE_BPE_NAME})
    return dest_dir


def _shape_sensevoice_weights(model, sp, auto_language: str, text_tokens_per_second: Optional[float] = None) -> None:
    """Turn random SenseVoice weights into a "well-formed output" generator.

    1. Shrink every cross-frame path (attention output projections and FSMN
       memory convolutions) so that each encoder output frame depends
       essentially on its own input frame.  The first four input frames are
       the learned query embeddings, so their encoder outputs become fixed
       vectors that do not depend on the audio.
    2. Compute those vectors (for every language / text-norm option) by
       running the encoder on a dummy input, and make the CTC output rows of
       the matching tags thresholded matched filters for them, so that a tag
       wins only on its query frame and never on audio frames.  Random text
       rows make the audio frames decode to random sentencepiece pieces.
    3. With ``text_tokens_per_second``, the CTC blank gets a constant logit
       that only that share of audio frames beats (see ``_blank_logit``).
    """
    enc = model.encoder
    d = enc.output_size()
    with torch.no_grad():
        for layer in list(enc.encoders0) + list(enc.encoders) + list(enc.tp_encoders):
            _scale_([layer.self_attn.linear_out.weight, layer.self_attn.linear_out.bias], 0.02)
            _scale_([layer.self_attn.fsmn_block.weight], 0.02)
        # Query embeddings: random, hence well separated (N(0,1) is also the
        # nn.Embedding default; made explicit here).
        model.embed.weight.normal_(0.0, 1.0)

        def query_outputs(lid: int, textnorm: int) -> torch.Tensor:
            """Encoder outputs of the 4 query frames (+ a few zero feature frames)."""
            idx = torch.tensor([[lid, _SV_EMO_INDEX, _SV_EVENT_INDEX, textnorm]])
            queries = model.embed(idx)  # (1, 4, FEAT_DIM)
            feats = torch.zeros(1, 8, FEAT_DIM)
            x = torch.cat([queries, feats], dim=1)
            out, _ = enc(x, torch.tensor([x.shape[1]]))
            return out[0, :4]

        # language="auto" behaves like language=auto_language: share the query.
        model.embed.weight[_SV_LID_INDEX["auto"]] = model.embed.weight[_SV_LID_INDEX[auto_language]]

        # Which vector each tag's CTC row should respond to.
        targets: Dict[str, torch.Tensor] = {}
        for lang, lid in _SV_LID_INDEX.items():
            if lang != "auto":
                targets[f"<|{lang}|>"] = query_outputs(lid, _SV_TEXTNORM_INDEX["woitn"])[0]
        for tn, tn_idx in _SV_TEXTNORM_INDEX.items():
            targets[f"<|{tn}|>"] = query_outputs(0, tn_idx)[3]
        base = query_outputs(0, _SV_TEXTNORM_INDEX["woitn"])
        targets["<|NEUTRAL|>"] = base[1]  # position 1 of real output: emotion
        targets["<|Speech|>"] = base[2]  # position 2 of real output: event

        ctc = model.ctc.ctc_lo  # Linear(d, vocab)
        # Random text rows.  The encoder ends in a LayerNorm (unit gain, zero
        # bias), so every output frame has norm sqrt(d) and text logits are
        # ~ N(0, (text_std * sqrt(d))^2), i.e. std 2 for d=64.
        text_std = 2.0 / math.sqrt(d)
        ctc.weight.normal_(0.0, text_std)
        ctc.bias.zero_()
        if text_tokens_per_second:
            ctc.weight[0].zero_()  # id 0, <unk>, is SenseVoice's CTC blank
            frame_s = LFR_N * 10 / 1000.0  # one LFR frame: 60 ms of audio
            ctc.bias[0] = _blank_logit(text_tokens_per_second * frame_s, sp.get_piece_size(), text_std * math.sqrt(d))
        # Tag rows are thresholded matched filters: logit = A * (cos - c0) /
        # (1 - c0), where cos is the cosine between the frame and the target
        # query output.  On the query frames cos ~= 1 (logit ~= A, far above
        # any text logit); audio frames are ~random directions (|cos| rarely
        # above 0.5 even over thousands of frames) and get a very negative
        # tag logit.  Without the threshold, long inputs (or long runs of
        # identical frames, e.g. digital silence) occasionally emit tags.
        on_logit, c0 = 16.0, 0.7
        gain = on_logit / ((1.0 - c0) * math.sqrt(d))
        for tok in SENSEVOICE_SPECIAL_TOKENS:
            tid = sp.piece_to_id(tok)
            vec = targets.get(tok)
            if vec is None:
                # Tags that we never emit: unreachable.
                ctc.weight[tid].zero_()
                ctc.bias[tid] = -1e4
                continue
            ctc.weight[tid] = gain * vec / vec.norm()
            ctc.bias[tid] = -on_logit * c0 / (1.0 - c0)
        # Never emit <s> / </s> (control symbols that decode to ""), nor any
        # piece that would not re-encode to exactly one id on its own (see
        # _train_sentencepiece; normally there are none).
        for tid in range(sp.get_piece_size()):
            if tid in (1, 2) or (tid > 2 and len(sp.encode(sp.id_to_piece(tid))) != 1):
                ctc.weight[tid].zero_()
                ctc.bias[tid] = -1e4


def _blank_logit(share: float, n_rows: int, sigma: float) -> float:
    """The logit that the best of ``n_rows`` independent N(0, sigma^2) text
    logits beats on ``share`` of the frames: P(max > b) = share, so
    b = sigma * Phi^-1((1 - share) ** (1 / n_rows))."""
    from statistics import NormalDist

    tail = -math.expm1(math.log1p(-share) / n_rows)  # 1 - (1 - share) ** (1 / n_rows), without rounding it away
    return sigma * NormalDist().inv_cdf(1.0 - tail)


# ---------------------------------------------------------------------------
# Paraformer (offline) and ParaformerStreaming
# ---------------------------------------------------------------------------


def _paraformer_token_list(n_chars: int = 120, n_words: int = 40) -> List[str]:
    """Character vocabulary in the layout of the real ``tokens.json``.

    0 = ``<blank>``, 1 = ``<s>``, 2 = ``</s>``, ..., last = ``<unk>``.
    Paraformer's decoder removes ids 0/1/2 and ``sentence_postprocess`` drops
    ``<unk>``.
    """
    words = [w for w in _ENGLISH_WORDS if w.isalpha()][:n_words]
    return ["<blank>", "<s>", "</s>"] + _CJK_CHARS[:n_chars] + words + ["<unk>"]


def _paraformer_config(d_model: int, enc_blocks: int, dec_blocks: int, streaming: bool) -> dict:
    encoder_conf = {
        "output_size": d_model,
        "attention_heads": 4,
        "linear_units": 2 * d_model,
        "num_blocks": enc_blocks,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "input_layer": "pe_online" if streaming else "pe",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
    }
    if streaming:
        # Training-time chunk configuration of the real online model; inference
        # uses generate(chunk_size=..., encoder_chunk_look_back=...) instead.
        encoder_conf.update(
            {
                "chunk_size": [12, 15],
                "stride": [8, 10],
                "pad_left": [0, 0],
                "encoder_att_look_back_factor": [4, 4],
                "decoder_att_look_back_factor": [1, 1],
            }
        )
    return {
        "model": "ParaformerStreaming" if streaming else "Paraformer",
        "model_conf": {
            "ctc_weight": 0.0,
            "lsm_weight": 0.1,
            "length_normalized_loss": True,
            "predictor_weight": 1.0,
            "predictor_bias": 1,
            "sampling_ratio": 0.75,
        },
        "encoder": "SANMEncoderChunkOpt" if streaming else "SANMEncoder",
        "encoder_conf": encoder_conf,
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            "attention_heads": 4,
            "linear_units": 2 * d_model,
            "num_blocks": dec_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "self_attention_dropout_rate": 0.1,
            "src_attention_dropout_rate": 0.1,
            "att_layer_num": dec_blocks,
            "kernel_size": 11,
            "sanm_shfit": 5 if streaming else 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {
            "idim": d_model,
            "threshold": 1.0,
            "l_order": 1,
            "r_order": 1,
            "tail_threshold": 0.45,
        },
        "frontend": "WavFrontendOnline" if streaming else "WavFrontend",
        "frontend_conf": dict(_FRONTEND_CONF, cmvn_file=None),
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "token_list": None},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def _build_paraformer_dir(
    dest_dir: str,
    streaming: bool,
    seed: int,
    d_model: int,
    enc_blocks: int,
    dec_blocks: int,
    tokens_per_second: float,
) -> str:
    dest_dir = _mkdir(dest_dir)
    tokens = _paraformer_token_list()
    config = _paraformer_config(d_model, enc_blocks, dec_blocks, streaming)
    with _seeded(seed):
        model = _instantiate(config, len(tokens))

    with torch.no_grad():
        # CIF predictor: alphas = sigmoid(cif_output(h)).  Zero the weight and
        # set the bias so that every 60 ms LFR frame contributes the same
        # weight -> a fixed number of tokens per second of audio, independent
        # of the (random) encoder output.  Otherwise a random predictor may
        # fire zero times, and Paraformer.inference() then returns no result.
        alpha = tokens_per_second * LFR_N * 10 / 1000.0
        model.predictor.cif_output.weight.zero_()
        model.predictor.cif_output.bias.fill_(math.log(alpha / (1.0 - alpha)))
        # Keep <blank>/<s>/</s>/<unk> out of the argmax so the text is never
        # silently shortened.
        out = model.decoder.output_layer
        for tid in (0, 1, 2, len(tokens) - 1):
            out.bias[tid] = -1e4

    with open(os.path.join(dest_dir, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=0)
    _write_model_files(dest_dir, config, model, {"token_list": "tokens.json"})
    return dest_dir


def build_paraformer(
    dest_dir: str,
    *,
    streaming: bool = False,
    seed: int = 0,
    d_model: int = 64,
    enc_blocks: int = 2,
    dec_blocks: int = 1,
    tokens_per_second: float = 4.0,
) -> str:
    """Build a tiny ``Paraformer`` (or, with ``streaming=True``, ``ParaformerStreaming``) model directory
    and return its path.

    Files written (same names as the ModelScope paraformer-zh repos):
    ``config.yaml``, ``configuration.json``, ``model.pt``, ``am.mvn`` and
    ``tokens.json`` (CharTokenizer vocabulary).  Use the streaming one like paraformer-zh-streaming::

        cache = {}
        for i, chunk in enumerate(chunks):          # 600 ms = 9600 samples each
            res = model.generate(input=chunk, cache=cache, is_final=(i == len(chunks) - 1),
                                 chunk_size=[0, 10, 5], encoder_chunk_look_back=4,
                                 decoder_chunk_look_back=1)
    """
    return _build_paraformer_dir(
        dest_dir, streaming, seed, d_model, enc_blocks, dec_blocks, tokens_per_second
    )
