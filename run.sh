#!/usr/bin/env bash
# The two quick-start commands: `./run.sh serve` (set up, then serve) and `./run.sh test` (set up, then test).
# Needs only Python 3.11 and pip. Installs into ./.venv; a torch already there is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${EMBSERVE_VENV:-.venv}

setup() {
  local extras=$1
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      $pip install -q "torch==2.13.0"            # PyPI's build carries CUDA
    else
      # No GPU: the CPU build where pip's own configuration offers one (find-links, or an index the user
      # set in PIP_EXTRA_INDEX_URL or pip.conf); else the plain wheel.
      $pip install -q "torch==2.13.0+cpu" 2>/dev/null || $pip install -q "torch==2.13.0"
    fi
  fi
  $pip install -q -e ".[$extras]"
}

case "${1:-}" in
  serve)
    setup bench
    shift
    # Serve's fast path (HAProxy in front, gRPC between deployments): deployments/serve_env.py.
    exports=$("$VENV/bin/python" -m deployments.serve_env)
    eval "$exports"
    # One node: its HAProxy notices a stopping ingress replica within a second, not Ray's 30 s.
    export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-2}
    exec "$VENV/bin/serve" run serve_config.yaml "$@"
    ;;
  test)
    setup test
    shift
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
    # Lets coverage follow into Ray's worker processes; inert unless a test session turns it on.
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo 'import os; exec(open(os.environ["EMBSERVE_COVERAGE_HOOK"]).read(), {"__name__": "embserve_coverage_hook"}) if os.environ.get("EMBSERVE_COVERAGE_HOOK") else None' \
      > "$site/embserve_coverage_hook.pth"
    exec "$VENV/bin/python" -m pytest --cov=embserve --cov=deployments --cov-report=term-missing \
      --cov-fail-under=95 "$@"
    ;;
  *)
    echo "usage: $0 serve | test [pytest args]" >&2
    exit 2
    ;;
esac
