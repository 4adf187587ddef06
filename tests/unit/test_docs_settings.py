"""Every setting is documented in docs/settings.md and listed in .env.example, and the example loads."""

import re
from pathlib import Path

from embserve.settings import Settings

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
