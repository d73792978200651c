"""A small word-level tokenizer for the tiny video LM: a fixed vocabulary built from the
synthetic world's caption/QA grammar plus special tokens, encode/decode, JSON save/load.
Words are separated by whitespace; it must not know anything about videos or models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .synthetic import VOCABULARY_WORDS

PAD, BOS, EOS, VIDEO, UNK = "<pad>", "<bos>", "<eos>", "<video>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, VIDEO, UNK)


class WordTokenizer:
    """Maps whitespace-separated words to ids; unknown words map to `<unk>`."""

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if list(vocab[:len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:5]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        self.vocab = vocab
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.video_id, self.unk_id = range(len(SPECIAL_TOKENS))

    @classmethod
    def from_grammar(cls) -> "WordTokenizer":
        return cls(list(SPECIAL_TOKENS) + list(VOCABULARY_WORDS))

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.word_to_id.get(w, self.unk_id) for w in text.lower().split()]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.vocab)})")
            if skip_special and i < len(SPECIAL_TOKENS):
                continue
            words.append(self.vocab[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.vocab}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        if data.get("type") != "word" or not isinstance(data.get("vocab"), list):
            raise ValueError(f"{path} is not a word tokenizer file (expected keys 'type': 'word', 'vocab')")
        return cls(data["vocab"])
