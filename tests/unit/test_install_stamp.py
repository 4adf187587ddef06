"""embserve.launch.install_stamp: run.sh installs once per change of pyproject.toml, not on every start."""

import subprocess
import sys
from pathlib import Path

from embserve.launch import install_stamp as stamp

ROOT = Path(__file__).resolve().parents[2]


def test_an_install_covers_the_same_pyproject_and_fewer_extras():
    fp = stamp.fingerprint(b"[project]", "3.11.7")
    after_test = stamp.updated(None, fp, ["test"])
    assert stamp.satisfied(after_test, fp, ["test"])
    assert stamp.satisfied(after_test, fp, [])  # serving needs no extra
    assert not stamp.satisfied(stamp.updated(None, fp, []), fp, ["test"])  # serve first, then the tests


def test_a_changed_pyproject_or_python_needs_an_install_and_forgets_the_old_extras():
    fp = stamp.fingerprint(b"[project]", "3.11.7")
    installed = stamp.updated(None, fp, ["test"])
    for changed in (stamp.fingerprint(b"[project] # edited", "3.11.7"), stamp.fingerprint(b"[project]", "3.12.1")):
        assert not stamp.satisfied(installed, changed, [])
        assert stamp.updated(installed, changed, [])["extras"] == []
    assert stamp.updated(installed, fp, [])["extras"] == ["test"]
    assert not stamp.satisfied(None, fp, [])


def test_run_sh_checks_then_records_with_the_venvs_python(tmp_path):
    """As run.sh calls the file, with no embserve installed: check fails, record, check passes."""
    script = str(ROOT / "embserve" / "launch" / "install_stamp.py")

    def run(*args):
        return subprocess.run([sys.executable, "-S", script, *args], capture_output=True, text=True).returncode

    assert run("check", str(tmp_path), "test") == 1
    assert run("record", str(tmp_path), "test") == 0
    assert run("check", str(tmp_path), "test") == 0
    assert run("check", str(tmp_path)) == 0
    (tmp_path / stamp.STAMP).write_text("not json")
    assert run("check", str(tmp_path)) == 1
    assert run("bogus", str(tmp_path)) == 2
