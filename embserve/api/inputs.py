"""Request inputs to one normalized shape, with every check that can happen before tokenization."""

from __future__ import annotations

from dataclasses import dataclass

from embserve.api.errors import InvalidRequest, PayloadTooLarge
from embserve.api.protocol import EmbeddingRequest


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_chars: int


@dataclass(frozen=True)
class NormalizedInput:
    texts: list[str] | None
    token_ids: list[list[int]] | None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def normalize_input(request: EmbeddingRequest, limits: Limits) -> NormalizedInput:
    """A string, list of strings, token ids or list of token-id lists -> texts or token-id lists."""
    raw = request.input
    if isinstance(raw, str):
        texts: list[str] | None = [raw]
        ids: list[list[int]] | None = None
    elif raw and isinstance(raw[0], str):
        texts, ids = list(raw), None  # type: ignore[arg-type]
    elif raw and isinstance(raw[0], int):
        texts, ids = None, [list(raw)]  # type: ignore[arg-type]
    else:
        texts, ids = None, [list(x) for x in raw]  # type: ignore[union-attr]
    count = len(texts if texts is not None else ids or [])
    if count > limits.max_inputs:
        raise PayloadTooLarge(
            f"{count} inputs in one request; the most this server accepts is {limits.max_inputs}",
            param="input", code="too_many_inputs",
        )
    for i, text in enumerate(texts or []):
        check_text(text, i, limits.max_chars)
    return NormalizedInput(texts=texts, token_ids=ids)


def check_prompt_name(name: str | None, available: tuple[str, ...] | list[str]) -> None:
    """A request's prompt_name must be one of the model's prompts (config_sentence_transformers.json)."""
    if name is None or name in available:
        return
    if available:
        message = (f"prompt_name {name!r} is not one of this model's prompts; available: "
                   + ", ".join(repr(n) for n in available))
    else:
        message = f"prompt_name {name!r} cannot be used: this model has no prompts (config_sentence_transformers.json)"
    raise InvalidRequest(message, param="prompt_name", code="unknown_prompt_name")


def check_rerank_input(query: str, documents: list[str], limits: Limits, field: str = "documents") -> None:
    """A rerank request's query and documents (`field` names them as the route does: `documents`, or TEI's
    `texts`): every check that can happen before tokenization, in the embeddings' terms."""
    check_text(query, None, limits.max_chars, field="query")
    if not documents:
        raise InvalidRequest(f"'{field}' is empty: there is nothing to rerank", param=field, code="empty_input")
    if len(documents) > limits.max_inputs:
        raise PayloadTooLarge(
            f"{len(documents)} {field} in one request; the most this server accepts is {limits.max_inputs}",
            param=field, code="too_many_inputs",
        )
    for i, text in enumerate(documents):
        check_text(text, i, limits.max_chars, field=field)


def check_text(text: str, index: int | None, max_chars: int, field: str = "input") -> None:
    """One text's checks; `field` and `index` name it in the message (`input[3]`, or `query` alone)."""
    name = field if index is None else f"{field}[{index}]"
    if not text.strip():
        raise InvalidRequest(f"{name} is empty or only whitespace", param=field, code="empty_input")
    if len(text) > max_chars:
        raise InvalidRequest(
            f"{name} has {len(text)} characters; the most this server accepts is {max_chars}",
            param=field, code="input_too_large",
        )
    if "\x00" in text:
        raise InvalidRequest(f"{name} contains a NUL character", param=field, code="invalid_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{name} is not valid Unicode (a lone surrogate)", param=field, code="invalid_text"
        ) from None
