"""The replica's forward workers: a few threads that run forwards, taking the most urgent one first.

Every run in flight queues its length groups here at once. A plain first-come pool would make a short
query that arrives during a big run wait for all of that run's groups; here each group is ranked by its
place in its own run, counted from the pool's clock when it was queued (the clock ticks once for every
`workers` forwards started). The first group of a new run goes ahead of the later groups of runs already
under way, runs share the workers group by group, and no group waits for ever: new work ranks later and
later as the clock runs.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class ForwardPool:
    def __init__(self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 name: str = "forward") -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers
        self._waiting: list[tuple[int, int, Future, Callable[..., Any], tuple]] = []
        self._arrivals = itertools.count()
        self._started = 0
        self._wake = threading.Condition()
        self._closed = False
        # Every worker runs the initializer before the pool is handed out; one that fails fails the pool.
        self._ready = threading.Barrier(workers + 1)
        self._init_error: BaseException | None = None
        self._threads = [threading.Thread(target=self._work, args=(initializer, initargs), name=f"{name}-{k}",
                                          daemon=True) for k in range(workers)]
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        if self._init_error is not None:
            self.shutdown()
            raise RuntimeError("a forward worker failed to start") from self._init_error

    def submit(self, fn: Callable[..., Any], *args: Any, rank: int = 0) -> Future:
        """Runs `fn(*args)` on a worker. Of the calls waiting, the lowest clock + `rank` goes first, then
        the oldest."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the forward pool is shut down")
            clock = self._started // self.workers
            heapq.heappush(self._waiting, (clock + rank, next(self._arrivals), future, fn, args))
            self._wake.notify()
        return future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def shutdown(self, wait: bool = True) -> None:
        """Stops taking calls; those already waiting are cancelled, those running finish."""
        with self._wake:
            self._closed = True
            for _, _, future, _, _ in self._waiting:
                future.cancel()
            self._waiting.clear()
            self._wake.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
        try:
            if initializer is not None:
                initializer(*initargs)
        except BaseException as exc:  # reported by __init__, which then shuts the pool down
            self._init_error = exc
        self._ready.wait()
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                _, _, future, fn, args = heapq.heappop(self._waiting)
                self._started += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller of this forward hears of it; the worker goes on
                future.set_exception(exc)
