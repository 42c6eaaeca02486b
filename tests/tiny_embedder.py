"""Build a tiny, random-weight sentence-transformers model offline: a one-layer BERT (hidden size 32) with a
WordPiece vocabulary of ASCII characters, common English words and the Chinese characters of the test documents,
plus mean pooling. It loads with ``SentenceTransformer(path)`` through the library's real code path. Its vectors
are meaningless (random weights): tests that need the right passage found rely on the BM25 half of retrieval.

    from tiny_embedder import build_tiny_embedder
    path = build_tiny_embedder(tmp_path / "embedder")
    path = build_tiny_embedder(tmp_path / "big", **DEFAULT_SIZE)  # the default model's shape, for timing (bench/rag_cost.py)
"""
from __future__ import annotations

import os

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a is in of and to what when where who how festival city river march april answer question".split()
CHINESE = "北京上海节日三月四月什么时候在哪里举行河流城市的是我你他猫狗名字叫"
# The shape of --embed_model's default, paraphrase-multilingual-MiniLM-L12-v2 (118 M parameters, 128 tokens at most):
# the same compute per token.
DEFAULT_SIZE = dict(hidden=384, layers=12, heads=12, intermediate=1536, vocab_size=250002)


def build_tiny_embedder(dest_dir: str | os.PathLike, seed: int = 0, words: tuple = (), hidden: int = 32, layers: int = 1,
                        heads: int = 2, intermediate: int = 64, vocab_size: int = 0) -> str:
    """Write the model to dest_dir and return its path. `words` join the vocabulary (one token each); `vocab_size`
    0 is the vocabulary's own size, more pads the embedding table to that size."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    dest_dir = os.fspath(dest_dir)
    bert_dir = os.path.join(dest_dir, "bert")
    os.makedirs(bert_dir, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!")
    vocab = list(dict.fromkeys(SPECIAL + chars + [f"##{c}" for c in chars] + WORDS + list(CHINESE) + [w.lower() for w in words]))
    with open(os.path.join(bert_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=os.path.join(bert_dir, "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=max(vocab_size, len(vocab)), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    model = SentenceTransformer(modules=[Transformer(bert_dir, max_seq_length=128), Pooling(hidden, "mean")], device="cpu")
    model.save(dest_dir)  # the whole model, loadable by SentenceTransformer(dest_dir)
    return dest_dir


if __name__ == "__main__":
    import sys

    print(build_tiny_embedder(sys.argv[1] if len(sys.argv) > 1 else "tiny-embedder"))
