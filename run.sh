#!/usr/bin/env bash
# The two quick-start commands: `./run.sh serve [CONFIG]` (set up, then `embserve serve`) and
# `./run.sh test [pytest args]` (set up with the test extras, then pytest).
# Needs only Python 3.11 and pip. Installs into ./.venv once per change of pyproject.toml (a stamp in the
# venv, embserve/launch/install_stamp.py); a torch already there is kept. Packages come from pip's own
# configuration (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${EMBSERVE_VENV:-.venv}

setup() {
  local extras=$1  # "" for serving, "test" for the tests
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if "$VENV/bin/python" embserve/launch/install_stamp.py check "$VENV" $extras; then
    return
  fi
  echo "run.sh: installing embserve${extras:+ with the $extras extras} into $VENV (first run, or pyproject.toml changed)" >&2
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      $pip install "torch==2.13.0"            # the plain wheel carries CUDA
    else
      # No GPU: the CPU build where pip's own configuration offers one (find-links, or an index the user
      # set in PIP_EXTRA_INDEX_URL or pip.conf); else the plain wheel.
      $pip install "torch==2.13.0+cpu" 2>/dev/null || $pip install "torch==2.13.0"
    fi
  fi
  $pip install -e ".${extras:+[$extras]}"
  "$VENV/bin/python" embserve/launch/install_stamp.py record "$VENV" $extras
}

case "${1:-}" in
  serve)
    shift
    setup ""
    exec "$VENV/bin/embserve" serve "$@"
    ;;
  test)
    shift
    setup test
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
    # Lets coverage follow into Ray's worker processes; inert unless a test session turns it on.
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo 'import os; exec(open(os.environ["EMBSERVE_COVERAGE_HOOK"]).read(), {"__name__": "embserve_coverage_hook"}) if os.environ.get("EMBSERVE_COVERAGE_HOOK") else None' \
      > "$site/embserve_coverage_hook.pth"
    # The 95% gate is for the whole suite; a selection (a path, -k, -m) reports coverage without it.
    gate=()
    [ $# -eq 0 ] && gate=(--cov-fail-under=95)
    exec "$VENV/bin/python" -m pytest --cov=embserve --cov=deployments --cov-report=term-missing "${gate[@]}" "$@"
    ;;
  *)
    echo "usage: $0 serve [CONFIG] | test [pytest args]" >&2
    exit 2
    ;;
esac
