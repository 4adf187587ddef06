"""The embedder module keeps Ray's max_concurrent_batches warning out of the replica's log: its coalescer
merges the concurrent batches, so the warning's advice (raise max_ongoing_requests) would be wrong."""

import logging

from deployments import embedder


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rays_batch_cap_warning_is_dropped_and_other_warnings_pass():
    logger = logging.getLogger("ray.serve")
    capture = Capture()
    logger.addHandler(capture)
    try:
        # The text ray/serve/batching.py logs when max_batch_size x max_concurrent_batches > max_ongoing_requests.
        logger.warning(f"`max_batch_size` (32) * `max_concurrent_batches` ({embedder.BATCH_CALLS}) is larger "
                       "than `max_ongoing_requests` (64). This means the replica will never achieve the "
                       "configured `max_batch_size` concurrently.")
        logger.warning("a request failed in the replica")
    finally:
        logger.removeHandler(capture)
    assert capture.messages == ["a request failed in the replica"]
