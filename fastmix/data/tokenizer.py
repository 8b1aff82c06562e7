"""Tokenizers for `fastmix prepare`: bytes by default (no download), BPE optionally.

A tokenizer is described in a store's meta.json by a small dict (`spec()`), and rebuilt from
it by `load_tokenizer(spec, store_dir)`, so a store always says how its tokens were made.
"""
import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus one end-of-document token (256)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def spec(self):
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer, kept as its JSON so that it pickles to workers."""

    EOS = "<|endoftext|>"

    def __init__(self, json_text):
        self.json_text = json_text
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _tokenizers().Tokenizer.from_str(self.json_text)
        return self._tokenizer

    def __getstate__(self):
        return {"json_text": self.json_text, "_tokenizer": None}

    @classmethod
    def from_file(cls, path):
        _tokenizers()  # fail early with the install hint
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    @classmethod
    def train(cls, texts, vocab_size):
        """Train a byte-level BPE locally on an iterator of strings."""
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer.to_str())

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self):
        # A user's tokenizer file may have no such token: documents are then just concatenated.
        return self.tokenizer.token_to_id(self.EOS)

    def encode(self, text):
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.uint32)

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids])

    def spec(self):
        return {"type": "bpe", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "file": "tokenizer.json"}

    def save(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(self.json_text)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "the BPE tokenizer needs the `tokenizers` package: pip install tokenizers "
            "(or use the default byte-level tokenizer)"
        ) from e
    return tokenizers


def load_tokenizer(spec, store_dir):
    """Rebuild the tokenizer a store was made with, from its meta.json `tokenizer` entry."""
    if spec["type"] == "byte":
        return ByteTokenizer()
    if spec["type"] == "bpe":
        return BPETokenizer.from_file(os.path.join(store_dir, spec["file"]))
    raise ValueError(f"unknown tokenizer type {spec['type']!r} in {store_dir}/meta.json")
