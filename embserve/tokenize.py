"""Tokenization owned by one replica: texts or token ids to model-ready ids, with length limits.

The Hugging Face tokenizer is always called with the same arguments (no truncation, no padding, no
special tokens), so its Rust state never changes between calls; truncation and special tokens are
applied here on plain lists. A replica's forward workers share it, one call at a time.

Token ids from a client are taken as the model's tokenizer gives them: `tokenizer(text)["input_ids"]`
already holds the special tokens (TEI and vLLM take such ids as given), so ids that begin and end with
them are kept as they are; ids without them get them added, as for text.
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


class TextIds(list):
    """A text's content ids from `Tokenizer.content_ids`: `finish` always adds special tokens to these,
    even where the text spells them out ("[CLS] hi [SEP]"), so a text embeds as the tokenizer's own call
    on it would. Any other list is token ids from a client, kept as they are if they already hold them."""


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
            ids = self._tok(
                texts, add_special_tokens=False, truncation=False, padding=False,
                return_attention_mask=False, return_token_type_ids=False, verbose=False,
            )["input_ids"]
        return [TextIds(x) for x in ids]

    def check_ids(self, ids: list[int], index: int) -> None:
        bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{index}] holds token id {bad}, outside this model's vocabulary [0, {self.vocab_size}); "
                "clients that send tiktoken ids, such as LangChain's OpenAIEmbeddings by default, should send "
                "text instead: set check_embedding_ctx_length=False",
                param="input", code="invalid_token_id",
            )

    def has_special_tokens(self, ids: list[int]) -> bool:
        """Whether client ids already begin and end with the model's special tokens."""
        head, tail = self.special.head, self.special.tail
        return (len(ids) >= len(head) + len(tail) and tuple(ids[: len(head)]) == head
                and tuple(ids[len(ids) - len(tail):]) == tail)

    def finish(self, content: list[int], index: int, truncate: bool) -> list[int]:
        """Add special tokens (unless client ids hold them already); cut or refuse content past the model's
        maximum."""
        if not isinstance(content, TextIds) and self.has_special_tokens(content):
            content = content[len(self.special.head): len(content) - len(self.special.tail)]
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
