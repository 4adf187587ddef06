"""Run by a .pth hook in every Ray worker of a test run, so that coverage sees the code Ray runs.

Ray starts its workers from the raylet, some forked at C level from a pre-started worker (a fork keeps
the tracer but loses threads, and Python's fork hooks do not run), and it ends replicas by killing
them, so atexit saving does not apply either. Coverage itself is started by its own startup hook
(COVERAGE_PROCESS_START); this adds a thread that saves what it has every second, started in each
process when it first imports embserve or deployments. Only active when the test session sets
EMBSERVE_COVERAGE_HOOK.
"""

import atexit
import os
import sys
import threading

import coverage

_saver_pid = None
_stop = threading.Event()


def _save_every_second() -> None:
    while not _stop.wait(1.0):
        cov = coverage.Coverage.current()  # started by coverage's own hook, possibly after this file ran
        if cov is not None:
            cov.save()


def _stop_saver(saver: threading.Thread) -> None:
    """At exit, before the interpreter tears down: a save still running in a daemon thread while modules
    are finalized can crash the process (seen as SIGSEGV at the end of `serve build` under the hook)."""
    _stop.set()
    saver.join(timeout=5)


class _StartSaverOnImport:
    """A meta-path finder that finds nothing; it only notices the first project import per process."""

    def find_spec(self, name, path=None, target=None):
        global _saver_pid
        if _saver_pid != os.getpid() and name.split(".")[0] in ("embserve", "deployments"):
            _saver_pid = os.getpid()
            _stop.clear()
            saver = threading.Thread(target=_save_every_second, name="coverage-saver", daemon=True)
            saver.start()
            atexit.register(_stop_saver, saver)
        return None


if not any(type(f).__name__ == "_StartSaverOnImport" for f in sys.meta_path):
    sys.meta_path.insert(0, _StartSaverOnImport())
