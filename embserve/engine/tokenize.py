"""Tokenization owned by one replica: texts or token ids to model-ready ids, with length limits.

The Hugging Face tokenizer is always called with the same arguments (no truncation, no padding, no
special tokens), so its Rust state never changes between calls; truncation and special tokens are
applied here on plain lists. A replica's forward workers share it, one call at a time.

Token ids from a client are taken as the model's tokenizer gives them: `tokenizer(text)["input_ids"]`
already holds the special tokens (TEI and vLLM take such ids as given), so ids that begin and end with
them are kept as they are; ids without them get them added, as for text.

Prompts (config_sentence_transformers.json) are put before each input here, once per tokenizer call: a text
gets the prompt's text in front (what sentence-transformers' encode tokenizes), and token ids get the prompt's
own ids in front (as TEI applies prompts to ids too), so ids embed like their text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from embserve.api.errors import EmbservError, InputTooLong, InvalidRequest
from embserve.api.inputs import check_prompt_name
from embserve.engine.pipeline import Prompts


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


@dataclass(frozen=True)
class Prompt:
    """A prompt as it goes before an input: its text (before a text) and its content ids (before token ids)."""

    text: str = ""
    ids: tuple[int, ...] = ()


NO_PROMPT = Prompt()


class TextIds(list):
    """A text's content ids from `Tokenizer.content_ids`: `finish` always adds special tokens to these,
    even where the text spells them out ("[CLS] hi [SEP]"), so a text embeds as the tokenizer's own call
    on it would. Any other list is token ids from a client, kept as they are if they already hold them."""


class Tokenizer:
    def __init__(self, tokenizer: Any, max_length: int, vocab_size: int, prompts: Prompts | None = None,
                 lowercase: bool = False) -> None:
        self._tok = tokenizer
        self._lock = threading.Lock()
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.lowercase = lowercase  # sentence_bert_config.json's do_lower_case: texts and prompts, not ids
        self.special = probe_special_tokens(tokenizer)
        self._room = max_length - len(self.special.head) - len(self.special.tail)
        if self._room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        prompts = prompts or Prompts()
        texts = {name: text.lower() if lowercase else text for name, text in prompts.texts.items()}
        ids = self.content_ids(list(texts.values()))
        self._prompts = {name: Prompt(text, tuple(i)) for (name, text), i in zip(texts.items(), ids)}
        self._default = self._prompts[prompts.default_name] if prompts.default_name else NO_PROMPT

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return tuple(self._prompts)

    def prompt(self, name: str | None) -> Prompt:
        """The prompt a request names, or the default one where it names none."""
        if name is None:
            return self._default
        check_prompt_name(name, self.prompt_names)
        return self._prompts[name]

    def prepare(self, jobs: list[Any]) -> list[list[list[int]] | EmbservError]:
        """Each job's inputs (an EmbedJob's texts or token ids) as model-ready ids, with one tokenizer call
        for every text of the batch, or the error that is the job's answer (an unknown prompt_name, an input
        too long, ids outside the vocabulary): a job's error never touches the others."""
        prompts: list[Prompt | EmbservError] = []
        for job in jobs:
            try:
                prompts.append(self.prompt(job.prompt_name))
            except EmbservError as err:
                prompts.append(err)
        texts = [t for job, prompt in zip(jobs, prompts) if job.texts is not None and isinstance(prompt, Prompt)
                 for t in self.model_texts(job.texts, prompt)]
        content = iter(self.content_ids(texts))
        prepared: list[list[list[int]] | EmbservError] = []
        for job, prompt in zip(jobs, prompts):
            if not isinstance(prompt, Prompt):
                prepared.append(prompt)
                continue
            raw = [next(content) for _ in job.texts] if job.texts is not None else list(job.token_ids or [])
            try:
                seqs = []
                for pos, ids in enumerate(raw):
                    if job.token_ids is not None:
                        self.check_ids(ids, pos)
                    seqs.append(self.finish(ids, pos, job.truncate, prompt))
                prepared.append(seqs)
            except EmbservError as err:
                prepared.append(err)
        return prepared

    def model_texts(self, texts: list[str], prompt: Prompt = NO_PROMPT) -> list[str]:
        """Texts as the model's tokenizer gets them: the prompt in front, lowercased where the model asks."""
        if prompt.text:
            texts = [prompt.text + text for text in texts]
        return [text.lower() for text in texts] if self.lowercase else texts

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

    def finish(self, content: list[int], index: int, truncate: bool, prompt: Prompt = NO_PROMPT) -> list[int]:
        """Add special tokens (unless client ids hold them already) and, to client ids, the prompt's ids; cut or
        refuse content past the model's maximum. A text's content already holds its prompt (`model_texts`)."""
        if not isinstance(content, TextIds):
            if self.has_special_tokens(content):
                content = content[len(self.special.head): len(content) - len(self.special.tail)]
            if prompt.ids:
                content = [*prompt.ids, *content]
        total = len(content) + len(self.special.head) + len(self.special.tail)
        if total > self.max_length:
            if not truncate:
                raise InputTooLong(
                    f"input[{index}] has {total} tokens, more than this model's maximum of "
                    f"{self.max_length}; shorten it or pass truncate=true",
                    param="input", tokens=total, maximum=self.max_length,
                )
            content = content[: self._room]
        return [*self.special.head, *content, *self.special.tail]
