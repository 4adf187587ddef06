"""Settings: EMB_PROVIDER_* variables, the .env file, serve_config args, and the batching knobs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from embserve.settings import BUNDLED_MODEL, BUNDLED_MODEL_NAME, BatchingConfig, ModelSpec, Settings

pytestmark = pytest.mark.usefixtures("clean_env")


def _keys(settings: Settings) -> list[str]:
    return settings.api_keys()


def test_defaults_serve_the_bundled_model_with_dynamic_batching():
    s = Settings()
    assert s.model == BUNDLED_MODEL
    assert s.model_name == BUNDLED_MODEL_NAME
    assert s.max_batch_size is None  # decided by the replica from its hardware
    assert s.batching().max_batch_size == 32 and s.batching(max_batch_size=256).max_batch_size == 256
    assert s.max_wait_time_ms == 0.0  # no timer: what queues during a forward shares the next run
    assert s.enable_dynamic_batching and s.enable_length_grouping
    assert s.truncate is False
    assert s.allow_tf32 is False  # float32 on a GPU keeps its 1e-5 contract unless asked
    assert _keys(s) == []
    [spec] = s.model_specs()
    assert spec.name == BUNDLED_MODEL_NAME and spec.source == BUNDLED_MODEL


def test_prefixed_env_vars_set_fields(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("EMB_PROVIDER_MAX_WAIT_TIME_MS", "12.5")
    monkeypatch.setenv("EMB_PROVIDER_ENABLE_LENGTH_GROUPING", "false")
    monkeypatch.setenv("EMB_PROVIDER_TRUNCATE", "true")
    monkeypatch.setenv("EMB_PROVIDER_MODEL_NAME", "mini")
    monkeypatch.setenv("EMB_PROVIDER_DEVICE", "cpu")
    monkeypatch.setenv("EMB_PROVIDER_FORWARD_WORKERS", "3")
    s = Settings()
    assert s.forward_workers == 3 and Settings.model_fields["forward_workers"].default is None
    assert s.max_batch_size == 64
    assert s.max_wait_time_ms == 12.5
    assert s.enable_length_grouping is False
    assert s.truncate is True
    assert s.model_name == "mini" and s.device == "cpu"


def test_unprefixed_env_vars_are_ignored(monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "64")
    assert Settings().max_batch_size is None


def test_invalid_env_value_is_rejected(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings()
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("EMB_PROVIDER_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_dotenv_file_in_working_directory_sets_fields(clean_env):
    (clean_env / ".env").write_text("EMB_PROVIDER_MAX_BATCH_SIZE=7\nEMB_PROVIDER_MODEL_NAME=from-dotenv\n")
    s = Settings()
    assert s.max_batch_size == 7
    assert s.model_name == "from-dotenv"


def test_precedence_is_args_then_env_then_dotenv_then_defaults(clean_env, monkeypatch):
    (clean_env / ".env").write_text(
        "EMB_PROVIDER_MAX_BATCH_SIZE=7\nEMB_PROVIDER_MIN_BATCH_SIZE=3\nEMB_PROVIDER_MAX_INPUT_CHARS=99\n"
    )
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("EMB_PROVIDER_MIN_BATCH_SIZE", "4")
    s = Settings(max_batch_size=11)
    assert s.max_batch_size == 11  # args beat env and .env
    assert s.min_batch_size == 4  # env beats .env
    assert s.max_input_chars == 99  # .env beats the default
    assert s.max_inputs_per_request == 2048  # the default where nobody says otherwise


def test_serve_config_style_args_validate_like_env(clean_env):
    s = Settings.model_validate({"max_batch_size": "16", "enable_dynamic_batching": "false"})
    assert s.max_batch_size == 16 and s.enable_dynamic_batching is False


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="'max_batch_sise' in serve_config.yaml args; did you mean 'max_batch_size'"):
        Settings(max_batch_sise=3)
    # The path Ray takes with serve_config.yaml's args: the same message, as a ValidationError.
    with pytest.raises(ValidationError, match="did you mean 'max_batch_size'"):
        Settings.model_validate({"max_batch_sise": 3})


def test_dotenv_may_hold_other_tools_keys(clean_env):
    (clean_env / ".env").write_text("HF_TOKEN=hf_secret\nOPENAI_API_KEY=sk-x\nEMB_PROVIDER_MIN_BATCH_SIZE=3\n")
    s = Settings()
    assert s.min_batch_size == 3
    assert "hf_secret" not in repr(s) and "hf_token" not in s.model_dump()


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_an_unknown_emb_provider_key_names_the_closest_setting(clean_env, monkeypatch, where):
    if where == "env":
        monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH", "64")
        place = "the environment"
    else:
        (clean_env / ".env").write_text("EMB_PROVIDER_MAX_BATCH=64\n")
        place = ".env"
    with pytest.raises(ValueError, match=f"'EMB_PROVIDER_MAX_BATCH' in {place}; did you mean 'EMB_PROVIDER_MAX_BATCH_SIZE'"):
        Settings()


def test_an_unknown_key_with_nothing_close_still_names_the_key(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_ZZZ", "1")
    with pytest.raises(ValueError, match=r"unknown setting 'EMB_PROVIDER_ZZZ' in the environment$"):
        Settings()


def test_each_value_knows_its_source_and_what_it_shadows(clean_env, monkeypatch):
    (clean_env / ".env").write_text("EMB_PROVIDER_MAX_BATCH_SIZE=7\nEMB_PROVIDER_MIN_BATCH_SIZE=2\n")
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("EMB_PROVIDER_TRUNCATE", "true")
    s = Settings.model_validate({"max_batch_size": 11})
    assert s.source_of("max_batch_size") == "args"
    assert s.source_of("truncate") == "environment EMB_PROVIDER_TRUNCATE"
    assert s.source_of("min_batch_size") == ".env EMB_PROVIDER_MIN_BATCH_SIZE"
    assert s.source_of("max_length") == "default" and not s.explicit("max_length")
    assert s.shadowed() == {"max_batch_size": "environment EMB_PROVIDER_MAX_BATCH_SIZE='9', "
                                              ".env EMB_PROVIDER_MAX_BATCH_SIZE='7'"}


def test_sources_travel_with_the_settings_to_the_replicas(monkeypatch):
    import pickle

    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "9")
    s = pickle.loads(pickle.dumps(Settings(min_batch_size=2)))
    assert (s.source_of("max_batch_size"), s.source_of("min_batch_size")) == ("environment EMB_PROVIDER_MAX_BATCH_SIZE", "args")


def test_api_keys_are_comma_separated_and_trimmed(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_API_KEY", " alpha, beta ,,gamma ")
    assert _keys(Settings()) == ["alpha", "beta", "gamma"]


def test_single_api_key_and_list_arg_both_work(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_API_KEY", "only")
    assert _keys(Settings()) == ["only"]
    assert _keys(Settings(api_key=["x", "y"])) == ["x", "y"]
    assert _keys(Settings(api_key="x,y")) == ["x", "y"]


def test_api_keys_from_dotenv(clean_env):
    (clean_env / ".env").write_text("EMB_PROVIDER_API_KEY=k1,k2\n")
    assert _keys(Settings()) == ["k1", "k2"]


def test_api_keys_never_show_in_repr_or_dump(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_API_KEY", "sk-very-secret")
    s = Settings()
    assert _keys(s) == ["sk-very-secret"]
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s.model_dump())
    assert "sk-very-secret" not in s.model_dump_json()


def test_api_key_file_adds_its_keys_one_per_line_or_comma_separated(clean_env, monkeypatch):
    key_file = clean_env / "keys.txt"
    key_file.write_text("file-1\n  file-2 , file-3\n\n")
    monkeypatch.setenv("EMB_PROVIDER_API_KEY", "env-key")
    monkeypatch.setenv("EMB_PROVIDER_API_KEY_FILE", str(key_file))
    s = Settings()
    assert _keys(s) == ["env-key", "file-1", "file-2", "file-3"]
    assert "file-1" not in repr(s)


def test_api_key_file_is_read_when_keys_are_asked_for(clean_env):
    key_file = clean_env / "keys.txt"
    key_file.write_text("old\n")
    s = Settings(api_key_file=str(key_file))
    assert _keys(s) == ["old"]
    key_file.write_text("new\n")
    assert _keys(s) == ["new"], "a rotated secret is picked up without a restart"


def test_model_aliases_are_comma_separated(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_MODEL_ALIASES", "mini, small")
    s = Settings()
    assert s.model_aliases == ["mini", "small"]
    assert s.model_specs()[0].aliases == ["mini", "small"]


def test_single_model_spec_is_built_from_flat_fields():
    s = Settings(model="/models/x", model_name="x", model_aliases=["y"], pooling="cls", max_length=128,
                 normalize=False)
    assert s.model_specs() == [ModelSpec(name="x", source="/models/x", aliases=["y"], pooling="cls",
                                         max_length=128, normalize=False)]


def test_models_list_overrides_the_flat_model_fields():
    s = Settings(model_name="ignored", models=[{"name": "a"}, {"name": "b", "aliases": ["bee"], "pooling": "mean"}])
    specs = s.model_specs()
    assert [spec.name for spec in specs] == ["a", "b"]
    assert specs[1].aliases == ["bee"] and specs[1].pooling == "mean"
    assert all(spec.source == BUNDLED_MODEL for spec in specs)


def test_models_list_from_env_json(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_MODELS", '[{"name": "a"}, {"name": "b", "max_length": 64}]')
    specs = Settings().model_specs()
    assert [(spec.name, spec.max_length) for spec in specs] == [("a", None), ("b", 64)]


@pytest.mark.parametrize(
    "models",
    [
        [{"name": "a"}, {"name": "a"}],
        [{"name": "a"}, {"name": "b", "aliases": ["a"]}],
        [{"name": "a", "aliases": ["x"]}, {"name": "b", "aliases": ["x"]}],
        [{"name": "a", "aliases": ["a"]}],
    ],
)
def test_duplicate_model_names_or_aliases_are_rejected(models):
    with pytest.raises(ValidationError, match="used twice"):
        Settings(models=models)


def test_single_model_alias_equal_to_its_name_is_rejected():
    with pytest.raises(ValidationError, match="used twice"):
        Settings(model_name="m", model_aliases=["m"])


def test_model_spec_refuses_unknown_fields_and_bad_pooling():
    with pytest.raises(ValidationError):
        ModelSpec(name="a", colour="blue")
    with pytest.raises(ValidationError):
        ModelSpec(name="a", pooling="weightedmean")
    with pytest.raises(ValidationError):
        ModelSpec(name="a", max_length=1)


def test_deployment_name_is_safe_for_ray():
    assert ModelSpec(name="org/model v2").deployment_name == "Embedder-org-model-v2"
    assert ModelSpec(name="all-MiniLM-L6-v2").deployment_name == "Embedder-all-MiniLM-L6-v2"
    assert ModelSpec(name="ms marco", task="rerank").deployment_name == "Reranker-ms-marco"


def test_task_is_embed_by_default_and_rerank_from_the_environment(clean_env, monkeypatch):
    assert Settings().model_specs()[0].task == "embed"
    monkeypatch.setenv("EMB_PROVIDER_TASK", "rerank")
    assert Settings().model_specs()[0].task == "rerank"
    with pytest.raises(ValidationError):
        ModelSpec(name="a", task="classify")


def test_batching_config_carries_the_settings_knobs():
    cfg = Settings(max_batch_size=8, max_wait_time_ms=20, min_batch_size=2, enable_length_grouping=False,
                   length_group_tolerance=0.5, max_batch_tokens=4096, group_cost_tokens=64).batching()
    assert cfg == BatchingConfig(max_batch_size=8, max_wait_time_ms=20, min_batch_size=2,
                                 enable_length_grouping=False, length_group_tolerance=0.5,
                                 max_batch_tokens=4096, group_cost_tokens=64)


def test_updated_takes_the_wait_in_ms_or_as_rays_seconds_and_keeps_other_values():
    base = BatchingConfig(max_batch_size=8, min_batch_size=2)
    new = base.updated({"max_wait_time_ms": 50})
    assert new.max_wait_time_ms == 50 and new.effective_wait_s == pytest.approx(0.05)
    assert new.max_batch_size == 8 and new.min_batch_size == 2
    assert base.max_wait_time_ms == 0.0, "the original is left as it was"
    assert new.updated({"batch_wait_timeout_s": 0.002}).max_wait_time_ms == pytest.approx(2.0)
    with pytest.raises(ValidationError, match="not both"):
        base.updated({"batch_wait_timeout_s": 0.002, "max_wait_time_ms": 2})


def test_updated_sets_named_keys():
    new = BatchingConfig().updated({"max_batch_size": 4, "enable_length_grouping": False, "max_batch_tokens": 1024})
    assert (new.max_batch_size, new.enable_length_grouping, new.max_batch_tokens) == (4, False, 1024)


@pytest.mark.parametrize("user_config", [None, {}])
def test_updated_with_no_user_config_changes_nothing(user_config):
    base = BatchingConfig(max_batch_size=3)
    assert base.updated(user_config) == base


@pytest.mark.parametrize(
    "user_config",
    [
        {"max_batch_sise": 4},
        {"max_batch_size": 0},
        {"length_group_tolerance": 1.5},
        {"max_batch_tokens": 8},
        {"max_wait_time_ms": 20_000},
        {"max_wait_time_ms": -1},
        {"batch_wait_timeout_s": -0.1},
    ],
)
def test_updated_rejects_unknown_or_invalid_keys(user_config):
    with pytest.raises(ValidationError):
        BatchingConfig().updated(user_config)


def test_effective_wait_is_zero_when_dynamic_batching_is_off():
    cfg = BatchingConfig(max_wait_time_ms=50)
    assert cfg.effective_wait_s == 0.05
    assert cfg.updated({"enable_dynamic_batching": False}).effective_wait_s == 0.0
    assert Settings(enable_dynamic_batching=False, max_wait_time_ms=30).batching().effective_wait_s == 0.0


def test_without_dynamic_batching_every_request_runs_alone():
    cfg = BatchingConfig(max_batch_size=32)
    assert cfg.effective_admit_batch_size == 32
    off = cfg.updated({"enable_dynamic_batching": False})
    assert off.effective_admit_batch_size == 1
    assert off.max_batch_size == 32, "turning it back on restores the configured size"
    assert off.updated({"enable_dynamic_batching": True}).effective_admit_batch_size == 32


def test_an_admission_gathers_max_batch_size_inputs_unless_admit_batch_size_is_set(monkeypatch):
    assert Settings().batching(max_batch_size=256).effective_admit_batch_size == 256
    monkeypatch.setenv("EMB_PROVIDER_ADMIT_BATCH_SIZE", "16")
    cfg = Settings(max_batch_size=64).batching()
    assert (cfg.max_batch_size, cfg.effective_admit_batch_size) == (64, 16)
    assert cfg.updated({"admit_batch_size": 8}).effective_admit_batch_size == 8  # user_config re-tunes it


@pytest.mark.parametrize("bad", [None, "abc", [1], True])
def test_user_config_wait_in_ms_must_be_a_number(bad):
    with pytest.raises(ValidationError, match="max_wait_time_ms"):
        BatchingConfig().updated({"max_wait_time_ms": bad})
