"""Cross-encoder reranking: a (query, document) pair as one input, the model that scores a padded group of
pairs, and the activation its sentence-transformers CrossEncoder applies.

A pair is tokenized as the model's tokenizer would tokenize it (its pair template and token types), with the
tokenizer's own `longest_first` truncation done here on plain lists, so that the Rust tokenizer is always
called with the same arguments (embserve/engine/tokenize.py says why). Scores equal `CrossEncoder.predict`'s.
Importing this module does not import torch: the ingress reads `RerankJob` and `activate` from it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from embserve.api.contracts import ModelInfo, RerankJob
from embserve.api.errors import EmbservError, InputTooLong, NonFiniteOutput, UnsupportedModel
from embserve.engine.pipeline import read_json
from embserve.engine.tokenize import Tokenizer
from embserve.settings import ModelSpec

log = logging.getLogger(__name__)

# Activations by the dotted name sentence-transformers saves (`fullname` of a torch module). A fixed list,
# never an import of whatever a config names: a config must not choose the code a replica runs.
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}


@dataclass(frozen=True)
class CrossEncoderConfig:
    """What a cross-encoder folder asks for: the activation on its one logit, and whether texts are lowercased."""

    activation: str  # a value of ACTIVATIONS
    activation_from: str  # where it was read, for the start log
    lowercase: bool = False


def _trusted(path: Any) -> str | None:
    """sentence-transformers imports an activation path only where it starts with 'torch.' (without
    trust_remote_code); any other is skipped, with a warning, for the next candidate."""
    return path if isinstance(path, str) and path.startswith("torch.") else None


def read_cross_encoder(source: str, revision: str | None = None) -> CrossEncoderConfig:
    """The cross-encoder a folder or hub repo holds, checked: a *ForSequenceClassification model with one label
    and, where it has sentence-transformers files, only its Transformer module. The activation is read where
    sentence-transformers 6 reads it, first found: config_sentence_transformers.json's `activation_fn`, config.json's
    `sentence_transformers.activation_fn`, its legacy `sbert_ce_default_activation_function`; else Sigmoid."""
    config = read_json(source, "config.json", revision)
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{source} has no config.json: not a transformers model")
    architectures = [str(a) for a in config.get("architectures") or []]
    if not architectures or not architectures[0].endswith("ForSequenceClassification"):
        raise UnsupportedModel(f"{source} is a {architectures[0] if architectures else 'model without architectures'}; "
                               "a rerank model must be a *ForSequenceClassification cross-encoder")
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else int(config.get("num_labels", 2))
    if labels != 1:
        raise UnsupportedModel(f"{source} has {labels} labels; embserve reranks with cross-encoders of one label "
                               "(one relevance score per pair)")
    modules = read_json(source, "modules.json", revision)
    st_cfg = read_json(source, "sentence_bert_config.json", revision)
    st_cfg = st_cfg if isinstance(st_cfg, dict) else {}
    if modules is not None:
        kinds = [str(m.get("type", "")) if isinstance(m, dict) else "?" for m in modules] if isinstance(modules, list) else ["?"]
        if len(kinds) != 1 or not kinds[0].startswith("sentence_transformers.") or not kinds[0].endswith(".Transformer"):
            raise UnsupportedModel(f"modules.json of {source} has the modules {kinds}; embserve reranks with a "
                                   "CrossEncoder of one Transformer module")
        task = st_cfg.get("transformer_task", "sequence-classification")
        if task != "sequence-classification":
            raise UnsupportedModel(f"sentence_bert_config.json sets transformer_task {task!r}; embserve reranks "
                                   "with 'sequence-classification' cross-encoders")
    st_model = read_json(source, "config_sentence_transformers.json", revision)
    st_model = st_model if isinstance(st_model, dict) else {}
    if st_model.get("default_prompt_name"):
        raise UnsupportedModel(f"{source} has a default prompt ({st_model['default_prompt_name']!r}); embserve "
                               "reranks without prompts")
    candidates = [("config_sentence_transformers.json activation_fn", st_model.get("activation_fn")),
                  ("config.json sentence_transformers.activation_fn",
                   (config.get("sentence_transformers") or {}).get("activation_fn")),
                  ("config.json sbert_ce_default_activation_function", config.get("sbert_ce_default_activation_function"))]
    for where, path in candidates:
        if path is not None and _trusted(path) is None:
            log.warning("%s %r is not a torch module; as sentence-transformers does, it is skipped", where, path)
        if _trusted(path) is not None:
            if path not in ACTIVATIONS:
                raise UnsupportedModel(f"{where} is {path!r}; embserve applies "
                                       f"{', '.join(ACTIVATIONS)} to a cross-encoder's score")
            return CrossEncoderConfig(ACTIVATIONS[path], where, bool(st_cfg.get("do_lower_case")))
    return CrossEncoderConfig("sigmoid", "default for one label", bool(st_cfg.get("do_lower_case")))


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scores from a cross-encoder's logits, in float32, as its `predict` applies the activation."""
    x = np.asarray(logits, dtype=np.float32)
    if activation == "sigmoid":
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
    if activation == "tanh":
        return np.tanh(x)
    return x


def longest_first(n1: int, n2: int, room: int) -> tuple[int, int]:
    """How many tokens of each sequence of a pair to keep so that both fit `room`: Hugging Face tokenizers'
    `longest_first` truncation (tokenizers' truncate_encodings), which sentence-transformers' CrossEncoder uses.
    The shorter sequence is kept whole where the longer alone can be cut to fit; else both get half the room,
    and the odd token goes to the longer one."""
    if n1 + n2 <= room:
        return n1, n2
    swap = n1 > n2
    short, long = (n2, n1) if swap else (n1, n2)
    long = short if short > room else max(short, room - short)
    if short + long > room:
        short = room // 2
        long = short + room % 2
    return (long, short) if swap else (short, long)


class PairIds(list):
    """A pair's token ids, model-ready; the first `first` of them carry the first segment's token type."""

    first: int = 0


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a pair (BERT: [CLS] q [SEP] d [SEP]; RoBERTa:
    <s> q </s></s> d </s>), and the token type of each segment."""

    head: tuple[int, ...]
    middle: tuple[int, ...]
    tail: tuple[int, ...]
    types: tuple[int, int]  # the first segment's (head, query, middle) and the second's (document, tail)

    def build(self, query: list[int], document: list[int]) -> PairIds:
        ids = PairIds([*self.head, *query, *self.middle, *document, *self.tail])
        ids.first = len(self.head) + len(query) + len(self.middle)
        return ids

    @property
    def added(self) -> int:
        return len(self.head) + len(self.middle) + len(self.tail)


def probe_pair_template(tokenizer: Any) -> PairTemplate:
    """The tokenizer's own pair template, read off one call on a known pair."""
    first = tokenizer("hello", add_special_tokens=False)["input_ids"]
    second = tokenizer("world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", "world", add_special_tokens=True, return_token_type_ids=True)
    ids, types = full["input_ids"], full.get("token_type_ids") or [0] * len(full["input_ids"])
    for a in range(len(ids) - len(first) + 1):
        if ids[a: a + len(first)] != first:
            continue
        for b in range(a + len(first), len(ids) - len(second) + 1):
            if ids[b: b + len(second)] == second:
                split = (types[a], types[b])
                if any(t != split[0] for t in types[:b]) or any(t != split[1] for t in types[b:]):
                    break
                return PairTemplate(tuple(ids[:a]), tuple(ids[a + len(first): b]), tuple(ids[b + len(second):]), split)
    raise UnsupportedModel("cannot read the tokenizer's pair template (where its special tokens and token types go)")


class PairTokenizer:
    """Pairs to model-ready ids with the pair's length limit: what a rerank replica's scheduler admits with."""

    def __init__(self, tokenizer: Any, max_length: int, vocab_size: int, lowercase: bool = False) -> None:
        self.template = probe_pair_template(tokenizer)
        self.max_length = max_length
        self.room = max_length - self.template.added
        if self.room < 2:
            raise ValueError(f"max_length {max_length} leaves no room for a pair")
        self.right = getattr(tokenizer, "truncation_side", "right") != "left"
        # The single-text tokenizer's one locked call and lowercasing; its prompts are never used here.
        self.texts = Tokenizer(tokenizer, max_length, vocab_size, lowercase=lowercase)

    def prepare(self, jobs: list[RerankJob]) -> list[list[list[int]] | EmbservError]:
        """Each job's pairs as ids, in one tokenizer call for every query and document of the batch, or the
        error that is its answer (a pair over the maximum without truncate)."""
        texts = [t for job in jobs for t in self.texts.model_texts([job.query, *job.documents])]
        content = iter(self.texts.content_ids(texts))
        out: list[list[list[int]] | EmbservError] = []
        for job in jobs:
            query = next(content)
            documents = [next(content) for _ in job.documents]
            try:
                out.append([self.pair(query, document, i, job.truncate, job.field)
                            for i, document in enumerate(documents)])
            except EmbservError as err:
                out.append(err)
        return out

    def pair(self, query: list[int], document: list[int], index: int, truncate: bool,
             field: str = "documents") -> PairIds:
        total = len(query) + len(document) + self.template.added
        if total > self.max_length:
            if not truncate:
                raise InputTooLong(f"{field}[{index}] with the query has {total} tokens, more than this model's "
                                   f"maximum of {self.max_length}; shorten it or pass truncate=true",
                                   param=field)
            keep_q, keep_d = longest_first(len(query), len(document), self.room)
            query, document = ((query[:keep_q], document[:keep_d]) if self.right
                               else (query[len(query) - keep_q:], document[len(document) - keep_d:]))
        return self.template.build(query, document)


def cross_encoder_max_length(spec: ModelSpec, config: object, tokenizer: Any) -> int:
    """As sentence-transformers' Transformer: the setting, else the tokenizer's model_max_length capped at the
    position limit; never past that limit."""
    position_limit = getattr(config, "max_position_embeddings", None)
    st_limit = int(tokenizer.model_max_length)
    if position_limit and position_limit > 0:
        st_limit = min(st_limit, int(position_limit))
    max_length = int(spec.max_length or st_limit)
    if position_limit and max_length > int(position_limit):
        raise ValueError(f"max_length {max_length} is more than {spec.name}'s position limit of "
                         f"{position_limit} tokens")
    return max_length


class CrossEncoderModel:
    """A *ForSequenceClassification cross-encoder; `forward` scores one padded group of pairs (its logits)."""

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 runtime: str = "torch") -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from embserve.engine.model import (
            attention_choice,
            device_map_loading,
            flash_attn_installed,
            place,
            resolve_source,
        )

        placed = place(device, dtype, threads)
        self.device, self.heap, choice = placed.device, placed.heap, placed.dtype
        self.dtype, self.autocast, self.dtype_reason = choice.weights, choice.autocast, choice.reason
        self.source = resolve_source(spec.source)
        self.cross_encoder = read_cross_encoder(self.source, spec.revision)
        pinned = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
        config = AutoConfig.from_pretrained(self.source, **pinned)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **pinned)
        attention, self.attention_reason = attention_choice(self.device, self.dtype, flash_attn_installed())
        extra = {"attn_implementation": attention} if attention else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.source, dtype=self.dtype, **device_map_loading(self.device), **extra, **pinned).to(self.device).eval()
        self.attention = str(getattr(self.model.config, "_attn_implementation", None) or "eager")
        # OpenVINO (the runtime setting) is embserve's for embedding models; a cross-encoder runs on torch.
        self.runtime = "torch"
        self.runtime_reason = ("torch: cross-encoders run on torch only" if runtime != "torch" else "set")
        self.max_length = cross_encoder_max_length(spec, config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        self.uses_token_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        self._pairs = PairTokenizer(self.tokenizer, self.max_length, self.vocab_size, self.cross_encoder.lowercase)
        log.info("cross-encoder %s: activation %s (%s), attention %s", spec.name, self.cross_encoder.activation,
                 self.cross_encoder.activation_from, self.attention)
        self.info = ModelInfo(name=spec.name, aliases=tuple(spec.aliases), dimensions=1, max_length=self.max_length,
                              vocab_size=self.vocab_size, pooling="none", device=self.device, dtype=choice.name,
                              task="rerank", activation=self.cross_encoder.activation)

    def request_tokenizer(self) -> PairTokenizer:
        return self._pairs

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        """One padded forward of a group of pairs: each pair's logit, float32 [n]. Plain id lists (warm-up, the
        health check) are one segment. Raises NonFiniteOutput, with the rows affected, as EmbeddingModel does."""
        logits = self._score(sequences)
        if self.heap is not None:
            self.heap.maybe_trim()
        bad = np.flatnonzero(~np.isfinite(logits))
        if bad.size:
            raise NonFiniteOutput(NonFiniteOutput.HINT.format(what=f"{bad.size} of {len(sequences)} pairs"),
                                  rows=tuple(int(r) for r in bad), vectors=logits)
        return logits

    def launch(self, sequences: list[list[int]]) -> Any:
        """The pipelined scheduler's launch (embserve/engine/gpu_pipeline.py; a GPU replica's one worker): the group's
        forward run to its end, its logits handed back as a finished Pending. A cross-encoder does not overlap
        its copies with the previous group's forward, as an embedding model's stream launcher does."""
        from embserve.engine.gpu_pipeline import Done

        try:
            return Done(self.forward(sequences))
        except NonFiniteOutput as err:
            return Done(error=err)

    def _score(self, sequences: list[list[int]]) -> np.ndarray:
        import torch

        from embserve.engine.model import padded_inputs, to_device

        ids, mask = padded_inputs(sequences, self.pad_id)
        inputs = {"input_ids": to_device(ids, self.device), "attention_mask": to_device(mask, self.device)}
        if self.uses_token_types:
            first_type, second_type = self._pairs.template.types
            firsts = torch.tensor([getattr(s, "first", len(s)) for s in sequences], dtype=torch.long)
            positions = torch.arange(ids.shape[1])
            types = torch.where(positions[None, :] < firsts[:, None], first_type, second_type)
            types = types.masked_fill(mask == 0, 0)  # padding gets type 0, as the tokenizer pads it
            inputs["token_type_ids"] = to_device(types, self.device)
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
                logits = self.model(**inputs).logits
            return logits.float()[:, 0].cpu().numpy()
