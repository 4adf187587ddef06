"""The sentence-transformers pipeline of a model folder or hub repo (modules.json and its config files): what
runs after the transformer, the prompts, or the reason the model is refused at load.

embserve runs the pipeline itself rather than through sentence-transformers, so anything it does not implement
exactly is refused here, at load, naming the module: a served vector always equals the model's own `encode`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embserve.api.errors import UnsupportedModel

# Pooling modes as sentence-transformers names them (its `pooling_mode`, or the legacy `pooling_mode_*` flags, in
# the order it concatenates them), and the name embserve gives the ones it runs.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}
SUPPORTED_POOLING = "cls, mean, max or lasttoken, one at a time"

# Dense activations by the dotted name sentence-transformers writes (its `fullname` of the torch class). A fixed
# list, never an import of whatever the file names: a config must not choose the code a replica runs.
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")
_ACTIVATION_PATHS = {f"torch.nn.modules.{'linear' if name == 'Identity' else 'activation'}.{name}": name
                     for name in ACTIVATIONS}

SUPPORTED_PIPELINE = "Transformer, then Pooling, then any number of Dense, then optionally Normalize"


def fetch(source: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a model folder, or of a hub repo at `revision` (from the local cache when offline), or None."""
    if os.path.isdir(source):
        path = Path(source) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError, OSError):
        return None


def read_json(source: str, filename: str, revision: str | None = None) -> Any:
    """A JSON file of a model folder or hub repo, or None where there is none."""
    path = fetch(source, filename, revision)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UnsupportedModel(f"{filename} of {source} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class DenseSpec:
    """One Dense module: its config and where its weights are (sentence-transformers' `linear.weight`/`.bias`)."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of ACTIVATIONS
    weights: Path


@dataclass(frozen=True)
class Prompts:
    """config_sentence_transformers.json's prompts: name -> text, and the one applied when a request names none."""

    texts: dict[str, str] = field(default_factory=dict)
    default_name: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.texts)


@dataclass(frozen=True)
class Pipeline:
    """What the model's sentence-transformers files ask for. `modules` is False for a plain transformers folder
    (no modules.json): the caller's defaults apply."""

    modules: bool = False
    pooling: str | None = None
    include_prompt: bool = True
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False
    prompts: Prompts = field(default_factory=Prompts)


def _kind(module: dict[str, Any]) -> str:
    """'Pooling' for 'sentence_transformers.models.Pooling' (and its newer module paths); '' for anything that is
    not one of sentence-transformers' own classes (a model's custom code, say)."""
    kind = str(module.get("type", ""))
    return kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else ""


def _describe(index: int, module: dict[str, Any]) -> str:
    return f"module {index} of modules.json ({module.get('type')!r}, path {module.get('path', '')!r})"


def read_pooling(cfg: dict[str, Any], where: str) -> tuple[str, bool]:
    """The one pooling mode a Pooling config asks for, and its include_prompt. As sentence-transformers reads it:
    `pooling_mode` (a name or a list), else the legacy flags that are true, else mean."""
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if cfg.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1:
        raise UnsupportedModel(f"{where} asks for {len(modes)} pooling modes ({', '.join(map(str, modes))}), "
                               f"concatenated; embserve runs {SUPPORTED_POOLING}")
    mode = POOLING_MODES.get(str(modes[0]))
    if mode is None:
        raise UnsupportedModel(f"{where} asks for {modes[0]!r} pooling, which embserve does not implement; it runs "
                               f"{SUPPORTED_POOLING}")
    return mode, bool(cfg.get("include_prompt", True))


def _check_feeds_sentence_embedding(cfg: dict[str, Any], where: str) -> None:
    """Dense and Normalize act on the pooled vector unless their config points them elsewhere (token
    embeddings, for multi-vector models): embserve only runs the former."""
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") != "sentence_embedding":
            raise UnsupportedModel(f"{where} has {key} {cfg[key]!r}; embserve runs Dense and Normalize on the "
                                   "pooled sentence_embedding only")


def read_dense(source: str, path: str, revision: str | None, where: str) -> DenseSpec:
    cfg = read_json(source, f"{path}/config.json", revision)
    if not isinstance(cfg, dict) or not {"in_features", "out_features"} <= set(cfg):
        raise UnsupportedModel(f"{where} has no config.json with in_features and out_features")
    _check_feeds_sentence_embedding(cfg, where)
    if cfg.get("use_residual"):
        raise UnsupportedModel(f"{where} has use_residual: true, which embserve does not implement")
    dotted = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    activation = _ACTIVATION_PATHS.get(dotted)
    if activation is None:
        raise UnsupportedModel(f"{where} uses the activation {dotted!r}; embserve runs Dense layers with "
                               f"{', '.join(ACTIVATIONS)} (torch.nn)")
    weights = fetch(source, f"{path}/model.safetensors", revision) or fetch(source, f"{path}/pytorch_model.bin", revision)
    if weights is None:
        raise UnsupportedModel(f"{where} has neither model.safetensors nor pytorch_model.bin")
    return DenseSpec(path=path, in_features=int(cfg["in_features"]), out_features=int(cfg["out_features"]),
                     bias=bool(cfg.get("bias", True)), activation=activation, weights=weights)


def read_prompts(source: str, revision: str | None, default_name: str | None = None) -> Prompts:
    """The prompts of config_sentence_transformers.json. `default_name` (a setting) overrides the model's
    default_prompt_name; "" applies none."""
    cfg = read_json(source, "config_sentence_transformers.json", revision)
    cfg = cfg if isinstance(cfg, dict) else {}
    texts = cfg.get("prompts") or {}
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise UnsupportedModel("config_sentence_transformers.json's prompts must map names to texts")
    name = cfg.get("default_prompt_name") if default_name is None else (default_name or None)
    if name is not None and name not in texts:
        what = "default_prompt_name setting" if default_name else "config_sentence_transformers.json's default_prompt_name"
        raise UnsupportedModel(f"the {what} {name!r} is not one of the model's prompts "
                               f"({', '.join(map(repr, texts)) or 'it has none'})")
    return Prompts(texts=dict(texts), default_name=name)


def check_transformer(st_cfg: dict[str, Any]) -> None:
    """sentence_bert_config.json may ask (sentence-transformers 5.2 and later) for another output of the model
    than its last hidden state, or a generative task: embserve pools the last hidden state only."""
    task = st_cfg.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise UnsupportedModel(f"sentence_bert_config.json sets transformer_task {task!r}; embserve runs "
                               "'feature-extraction' models only")
    text = (st_cfg.get("modality_config") or {}).get("text", {"method": "forward", "method_output_name": "last_hidden_state"})
    if (text.get("method"), text.get("method_output_name")) != ("forward", "last_hidden_state"):
        raise UnsupportedModel(f"sentence_bert_config.json embeds text with {text!r}; embserve pools the model's "
                               "forward last_hidden_state only")


def read_pipeline(source: str, revision: str | None = None, default_prompt_name: str | None = None,
                  pooling_setting: str | None = None) -> Pipeline:
    """The model's sentence-transformers pipeline, checked: only what embserve computes exactly passes.
    `pooling_setting`: a pooling mode set explicitly, which wins over (and skips the check of) the model's."""
    modules = read_json(source, "modules.json", revision)
    st_cfg = read_json(source, "sentence_bert_config.json", revision)
    st_cfg = st_cfg if isinstance(st_cfg, dict) else {}
    prompts = read_prompts(source, revision, default_prompt_name)
    plain = Pipeline(max_seq_length=st_cfg.get("max_seq_length"), lowercase=bool(st_cfg.get("do_lower_case")),
                     prompts=prompts)
    if modules is None:
        return plain
    check_transformer(st_cfg)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise UnsupportedModel(f"modules.json of {source} is not a list of modules")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    first = modules[0]
    if _kind(first) != "Transformer" or str(first.get("path", "")) not in ("", "."):
        raise UnsupportedModel(f"{_describe(0, first)} is not supported: embserve runs a Transformer at the model's "
                               f"root first, then Pooling, Dense and Normalize ({SUPPORTED_PIPELINE})")
    pooling, include_prompt, dense, normalize = None, True, [], False
    for index, module in enumerate(modules[1:], start=1):
        kind, where, path = _kind(module), _describe(index, module), str(module.get("path", ""))
        if kind == "Pooling" and pooling is None and not normalize:
            cfg = read_json(source, f"{path}/config.json", revision)
            cfg = cfg if isinstance(cfg, dict) else {}
            pooling, include_prompt = ((pooling_setting, bool(cfg.get("include_prompt", True))) if pooling_setting
                                       else read_pooling(cfg, f"{where}: its config.json"))
        elif kind == "Dense" and pooling is not None and not normalize:
            dense.append(read_dense(source, path, revision, where))
        elif kind == "Normalize" and pooling is not None and not normalize:
            cfg = read_json(source, f"{path}/config.json", revision) if path else None
            _check_feeds_sentence_embedding(cfg if isinstance(cfg, dict) else {}, where)
            normalize = True
        else:
            raise UnsupportedModel(f"{where} is not supported here: embserve runs {SUPPORTED_PIPELINE}, and "
                                   f"refuses other pipelines rather than serve different vectors")
    if pooling is None:
        raise UnsupportedModel(f"modules.json of {source} has no Pooling module: it gives no sentence embedding")
    if not include_prompt and prompts.texts:
        # sentence-transformers would pool without the prompt's tokens; embserve pools every token.
        raise UnsupportedModel("the Pooling config sets include_prompt: false and the model has prompts "
                               f"({', '.join(map(repr, prompts.texts))}); embserve pools prompt tokens too, so it "
                               "refuses the model rather than serve different vectors")
    return Pipeline(modules=True, pooling=pooling, include_prompt=include_prompt, dense=tuple(dense),
                    normalize=normalize, max_seq_length=plain.max_seq_length, lowercase=plain.lowercase,
                    prompts=prompts)


