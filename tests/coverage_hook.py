"""Run by a .pth hook in every Ray worker of a test run, so that coverage sees the code Ray runs.

Ray starts its workers from the raylet, some forked at C level from a pre-started worker (a fork keeps
the tracer but loses threads, and Python's fork hooks do not run), and it ends replicas by killing
them, so atexit saving does not apply either. Coverage itself is started by its own startup hook
(COVERAGE_PROCESS_START); this adds a thread that saves what it has every second, started in each
process when it first imports embserve or deployments. Only active when the test session sets
EMBSERVE_COVERAGE_HOOK.
"""

import os
import sys
import threading
import time

import coverage

_saver_pid = None


def _save_every_second() -> None:
    while True:
        time.sleep(1.0)
        cov = coverage.Coverage.current()  # started by coverage's own hook, possibly after this file ran
        if cov is not None:
            cov.save()


class _StartSaverOnImport:
    """A meta-path finder that finds nothing; it only notices the first project import per process."""

    def find_spec(self, name, path=None, target=None):
        global _saver_pid
        if _saver_pid != os.getpid() and name.split(".")[0] in ("embserve", "deployments"):
            _saver_pid = os.getpid()
            threading.Thread(target=_save_every_second, name="coverage-saver", daemon=True).start()
        return None


if not any(type(f).__name__ == "_StartSaverOnImport" for f in sys.meta_path):
    sys.meta_path.insert(0, _StartSaverOnImport())
