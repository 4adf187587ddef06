"""`python -m bench`: one entry point whose help lists every benchmark and study, each subcommand's own help
working without Ray, and the old `python -m bench.<module>` spellings going through the same parser."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import COMMANDS, STUDIES, SUITE

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def bench(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    """Top-level packages in `python -X importtime`'s report."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:")}


def test_bench_help_lists_every_subcommand_and_imports_no_benchmark():
    done = bench("bench", "--help", importtime=True)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = set(re.findall(r"^    (\S+)", done.stdout, flags=re.M))
    assert listed == set(COMMANDS)
    assert not {"torch", "ray", "httpx"} & imported(done.stderr)


def test_studies_are_apart_from_the_suite():
    assert not set(SUITE) & set(STUDIES)
    assert all(c.module.startswith("bench.studies.") for c in STUDIES.values())
    assert not any(c.module.startswith("bench.studies.") for c in SUITE.values())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_help_works_without_ray(name):
    done = bench("bench", name, "--help", importtime=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m bench {name}")
    assert "ray" not in imported(done.stderr)


@pytest.mark.parametrize("module", ["bench.gpu", "bench.load", "bench.run"])
def test_old_module_invocations_reach_the_same_subcommand(module):
    """../shared/gpu_check.sh runs `python -m bench.gpu` and `python -m bench.load`; docs cite bench.run."""
    done = bench(module, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    name = next(n for n, c in COMMANDS.items() if c.module == module)
    assert done.stdout.startswith(f"usage: python -m bench {name}")


def test_an_unknown_subcommand_is_refused_with_the_list():
    done = bench("bench", "no-such-bench")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "run" in done.stderr


def test_bench_sources_name_no_machine_paths_or_commits():
    machine = re.compile(r"/work/|/root/|/home/|/tmp/")
    commit = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "bench").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if machine.search(line) or commit.search(line)]
    assert found == []


def test_a_run_s_json_lands_in_a_folder_made_for_it_with_paths_as_text(tmp_path):
    from bench.common import write_json

    out = tmp_path / "build" / "new" / "run.json"
    write_json(out, {"model": Path("/models/x"), "texts_per_s": [97.1, 109.2]})
    assert json.loads(out.read_text()) == {"model": "/models/x", "texts_per_s": [97.1, 109.2]}
