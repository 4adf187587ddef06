"""Tokenization owned by one replica: texts or token ids to model-ready ids, with length limits.

The Hugging Face tokenizer is always called with the same arguments (no truncation, no padding, no
special tokens), so its Rust state never changes between calls; truncation and special tokens are
applied here on plain lists. A replica's forward workers share it, one call at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from embserve.errors import InputTooLong, InvalidRequest


@dataclass(frozen=True)
class SpecialTokens:
    head: tuple[int, ...]
    tail: tuple[int, ...]


def probe_special_tokens(tokenizer: Any) -> SpecialTokens:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] and [SEP] for BERT)."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return SpecialTokens(tuple(full[:start]), tuple(full[start + len(bare) :]))
    raise ValueError("cannot locate the text inside the tokenizer's special tokens")


class Tokenizer:
    def __init__(self, tokenizer: Any, max_length: int, vocab_size: int) -> None:
        self._tok = tokenizer
        self._lock = threading.Lock()
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.special = probe_special_tokens(tokenizer)
        self._room = max_length - len(self.special.head) - len(self.special.tail)
        if self._room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")

    def content_ids(self, texts: list[str]) -> list[list[int]]:
        """One tokenizer call for all texts of a batch."""
        if not texts:
            return []
        with self._lock:
            return self._tok(
                texts, add_special_tokens=False, truncation=False, padding=False,
                return_attention_mask=False, return_token_type_ids=False, verbose=False,
            )["input_ids"]

    def check_ids(self, ids: list[int], index: int) -> None:
        bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{index}] holds token id {bad}, outside this model's vocabulary [0, {self.vocab_size})",
                param="input", code="invalid_token_id",
            )

    def finish(self, content: list[int], index: int, truncate: bool) -> list[int]:
        """Add special tokens; cut or refuse content past the model's maximum."""
        total = len(content) + len(self.special.head) + len(self.special.tail)
        if total > self.max_length:
            if not truncate:
                raise InputTooLong(
                    f"input[{index}] has {total} tokens, more than this model's maximum of "
                    f"{self.max_length}; shorten it or pass truncate=true",
                    param="input",
                )
            content = content[: self._room]
        return [*self.special.head, *content, *self.special.tail]
