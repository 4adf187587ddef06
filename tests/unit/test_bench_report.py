"""bench.report renders what a smoke run measures (the batching-off and full-engine configurations, no sweep)
as well as a full run, and says how the configurations were served."""

import json
from pathlib import Path

import pytest

from bench.measure import QUICK
from bench.run import CONFIGS, FULL_ENGINE

ROOT = Path(__file__).resolve().parents[2]


def test_a_smoke_run_serves_the_two_configurations_the_headline_compares():
    from bench.report import BATCHING_OFF

    assert set(QUICK.only) == {BATCHING_OFF, FULL_ENGINE} and set(QUICK.only) <= set(CONFIGS)
    assert QUICK.sweep == ()


def test_the_report_of_a_smoke_run_with_a_tuned_layout(tmp_path: Path):
    pytest.importorskip("matplotlib")  # the bench extra
    from bench.report import write_report

    results = json.loads((ROOT / "docs" / "bench" / "results.json").read_text())  # a full run's
    results.update(mode="quick", sweep=[], extras=[])
    results.pop("profile", None)
    configs = {name: results["configs"][name] for name in QUICK.only}
    configs["tuned (tuned.yaml)"] = {**configs[FULL_ENGINE], "settings": {}, "config": "/somewhere/tuned.yaml"}
    results["configs"] = configs
    results["service"] = {"command": "embserve serve", "config": "serve_config.yaml", "tuned": "tuned.yaml",
                          "fast_path": True}
    page = write_report(results, tmp_path).read_text()
    assert "`python -m bench run --quick`" in page
    assert "`embserve serve` of `serve_config.yaml`" in page
    assert "### tuned (tuned.yaml) (its own config, tuned.yaml)" in page
    assert "### one forward on all threads" not in page
    assert (tmp_path / "bench" / "throughput.png").stat().st_size > 0
