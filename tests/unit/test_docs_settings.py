"""Every setting is documented in docs/settings.md and listed in .env.example, and the example loads."""

import re
from pathlib import Path

import pytest
import yaml

from embserve.settings import (
    BUNDLED_MODEL_NAME,
    SPEC_FIELD,
    BatchingConfig,
    BatchingKnobs,
    ModelOptions,
    ModelSpec,
    Settings,
)

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_row_in_docs_settings():
    rows = re.findall(r"^\| `(\w+)` \| `(EMB_PROVIDER_\w+)`", (ROOT / "docs/settings.md").read_text(), re.M)
    documented = {name: env for name, env in rows}
    assert set(documented) == set(Settings.model_fields)
    for name, env in documented.items():
        assert env == f"EMB_PROVIDER_{name.upper()}"


def test_env_example_names_every_setting_and_loads(tmp_path, monkeypatch):
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#? ?EMB_PROVIDER_(\w+)=", text, re.M))
    assert named == {name.upper() for name in Settings.model_fields}
    (tmp_path / ".env").write_text(text)
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.model_specs()[0].name == "all-MiniLM-L6-v2"
    assert settings.api_keys() == []
    assert not any(settings.explicit(name) for name in Settings.model_fields)  # copied as is, it changes nothing
    # Every example value is valid once uncommented (the keys and the models list aside).
    uncommented = re.sub(r"^# (EMB_PROVIDER_(?!API_KEY|MODELS)\w+=)", r"\1", text, flags=re.M)
    (tmp_path / ".env").write_text(uncommented)
    settings = Settings()
    assert settings.source_of("max_batch_size") == ".env EMB_PROVIDER_MAX_BATCH_SIZE" and settings.max_batch_size == 64


# A value other than the default for every documented setting, as written in the environment or .env.
SAMPLES = {
    "model": "/models/x", "model_name": "mini", "model_aliases": "small, tiny", "task": "rerank", "pooling": "cls",
    "max_length": "128", "normalize": "false", "revision": "v1.0", "trust_remote_code": "true",
    "default_prompt_name": "query", "models": '[{"name": "a"}, {"name": "b", "max_length": 64}]',
    "device": "cpu", "dtype": "float32", "allow_tf32": "true", "num_gpus": "1", "runtime": "torch",
    "openvino_cache_dir": "/tmp/ov-cache", "torch_threads": "3", "forward_workers": "2",
    "gpu_memory_fraction": "0.5", "max_batch_size": "64", "max_wait_time_ms": "12.5", "admit_batch_size": "16",
    "min_batch_size": "3", "enable_dynamic_batching": "false", "enable_length_grouping": "false",
    "length_group_tolerance": "0.5", "max_batch_tokens": "4096", "group_cost_tokens": "96", "max_forward_ms": "100",
    "truncate": "true", "max_inputs_per_request": "10", "max_input_chars": "500", "max_body_bytes": "4096",
    "request_timeout_s": "5", "health_timeout_s": "1.5", "max_queued_requests": "-1", "api_key": "k1, k2",
    "api_key_file": "keys.txt", "metrics_public": "true",
}
# What the engine reads back for each sample: through the ModelSpec, the BatchingConfig or the key list it
# uses, else the setting itself.
EXPECTED = {
    "model": "/models/x", "model_name": "mini", "model_aliases": ["small", "tiny"], "task": "rerank", "pooling": "cls",
    "max_length": 128, "normalize": False, "revision": "v1.0", "trust_remote_code": True,
    "default_prompt_name": "query", "models": [("a", None), ("b", 64)], "device": "cpu", "dtype": "float32",
    "allow_tf32": True, "num_gpus": 1.0, "runtime": "torch", "openvino_cache_dir": "/tmp/ov-cache",
    "torch_threads": 3, "forward_workers": 2, "gpu_memory_fraction": 0.5, "max_batch_size": 64,
    "max_wait_time_ms": 12.5, "admit_batch_size": 16, "min_batch_size": 3, "enable_dynamic_batching": False,
    "enable_length_grouping": False, "length_group_tolerance": 0.5, "max_batch_tokens": 4096,
    "group_cost_tokens": 96, "max_forward_ms": 100.0, "truncate": True, "max_inputs_per_request": 10,
    "max_input_chars": 500, "max_body_bytes": 4096, "request_timeout_s": 5.0, "health_timeout_s": 1.5,
    "max_queued_requests": -1, "api_key": ["k1", "k2"], "api_key_file": ["from-file"], "metrics_public": True,
}


def documented() -> dict[str, list[str]]:
    """Each setting of docs/settings.md's table: its row's cells after the name."""
    rows = re.findall(r"^\| `(\w+)` \| (`EMB_PROVIDER_\w+`.*)$", (ROOT / "docs/settings.md").read_text(), re.M)
    return {name: [cell.strip() for cell in rest.split(" | ")] for name, rest in rows}


def engine_view(settings: Settings, name: str):
    """A setting as the engine reads it: a model field from the ModelSpec the replica gets, a batching knob
    from the BatchingConfig it runs with, the keys from api_keys(); the rest from the settings."""
    if name == "models":
        return [(spec.name, spec.max_length) for spec in settings.model_specs()]
    if name in SPEC_FIELD or name in ModelOptions.model_fields:
        return getattr(settings.model_specs()[0], SPEC_FIELD.get(name, name))
    if name in BatchingKnobs.model_fields:
        return getattr(settings.batching(), name)
    if name in ("api_key", "api_key_file"):
        return settings.api_keys()
    return getattr(settings, name)


def test_every_documented_setting_has_a_sample_here():
    assert set(SAMPLES) == set(EXPECTED) == set(documented())


@pytest.mark.parametrize("where", ["environment", ".env", "args"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_documented_setting_reaches_the_engine_from_each_source(clean_env, monkeypatch, name, where):
    (clean_env / "keys.txt").write_text("from-file\n")
    assert engine_view(Settings(), name) != EXPECTED[name], "the sample must differ from the default"
    env_name = f"EMB_PROVIDER_{name.upper()}"
    if where == "environment":
        monkeypatch.setenv(env_name, SAMPLES[name])
        settings = Settings()
        assert settings.source_of(name) == f"environment {env_name}"
    elif where == ".env":
        (clean_env / ".env").write_text(f"{env_name}='{SAMPLES[name]}'\n")
        settings = Settings()
        assert settings.source_of(name) == f".env {env_name}"
    else:  # serve_config.yaml's args, as YAML reads them
        settings = Settings.model_validate({name: yaml.safe_load(SAMPLES[name])})
        assert settings.source_of(name) == "args"
    assert engine_view(settings, name) == EXPECTED[name]


def test_the_runtime_knobs_are_the_batching_configs_and_each_is_accepted_in_user_config():
    runtime = {name for name, cells in documented().items() if cells[2].startswith("yes")}
    assert runtime == set(BatchingConfig.model_fields)
    for name in BatchingConfig.model_fields:
        assert getattr(BatchingConfig().updated({name: yaml.safe_load(SAMPLES[name])}), name) == EXPECTED[name]


def test_each_default_and_description_is_declared_once_for_settings_and_what_the_engine_builds():
    # The flat settings are the same fields as the ModelSpec and BatchingConfig ones: a default changed in
    # BatchingKnobs or ModelOptions is the default everywhere.
    for shared, built in ((BatchingKnobs, BatchingConfig), (ModelOptions, ModelSpec)):
        for name, field in shared.model_fields.items():
            assert repr(Settings.model_fields[name]) == repr(field) == repr(built.model_fields[name]), name
    for flat, own in SPEC_FIELD.items():
        assert Settings.model_fields[flat].description == ModelSpec.model_fields[own].description, flat
    # So the defaults of the settings give the defaults of what the engine builds from them.
    assert Settings.model_validate({}).model_specs() == [ModelSpec(name=BUNDLED_MODEL_NAME)]
    open_sizes = {"max_batch_size", "max_batch_tokens"}  # a replica fills these from its hardware
    assert Settings.model_validate({}).batching().model_dump(exclude=open_sizes) == BatchingConfig().model_dump(
        exclude=open_sizes)
