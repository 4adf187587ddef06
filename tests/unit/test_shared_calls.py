"""embserve.api.calls: requests of one turn of the ingress's loop share a call; each keeps its own answer, error
and cancellation. The sender here is a plain function with an asyncio future per call, as a Serve handle's
`.remote` returns an awaitable with `cancel()`; the real handle's path is tests/integration/test_batching.py's."""

from __future__ import annotations

import asyncio

import pytest

from embserve.api.calls import SHARED_MAX_CHARS, SharedCalls, capacity_of, room_for
from embserve.api.contracts import EmbedJob, RerankJob


class Sent:
    """A call as the sender saw it: its jobs, and the future its caller awaits."""

    def __init__(self, jobs, many: bool) -> None:
        self.jobs, self.many = jobs, many
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.future.cancel()

    def __await__(self):
        return self.future.__await__()

    def answer(self) -> None:
        results = [f"vector of {getattr(job, 'texts', job)}" for job in self.jobs]
        self.future.set_result(results if self.many else results[0])


def shared() -> tuple[SharedCalls, list[Sent]]:
    sent: list[Sent] = []

    def one(job):
        sent.append(Sent([job], many=False))
        return sent[-1]

    def many(jobs):
        sent.append(Sent(list(jobs), many=True))
        return sent[-1]

    return SharedCalls(one, many), sent


def run(coroutine):
    return asyncio.run(coroutine)


class Job(str):
    """A short request's stand-in: a name, and the characters the sharing decision reads."""

    chars = 10


def test_requests_of_one_turn_share_one_call_and_each_gets_its_own_answer():
    async def go():
        calls, sent = shared()
        waits = [calls.call(Job(job))[0] for job in ("a", "b", "c")]
        await asyncio.sleep(0)  # the turn ends: the call leaves
        assert [(s.jobs, s.many) for s in sent] == [(["a", "b", "c"], True)]
        sent[0].answer()
        assert await asyncio.gather(*waits) == ["vector of a", "vector of b", "vector of c"]
    run(go())


def test_a_request_alone_in_its_turn_goes_as_it_always_went_and_nothing_waits_for_company():
    async def go():
        calls, sent = shared()
        first, _ = calls.call(Job("a"))
        await asyncio.sleep(0)
        second, _ = calls.call(Job("b"))
        await asyncio.sleep(0)
        assert [(s.jobs, s.many) for s in sent] == [(["a"], False), (["b"], False)]
        for s in sent:
            s.answer()
        assert [await first, await second] == ["vector of a", "vector of b"]
    run(go())


def test_a_call_is_cancelled_only_once_every_request_in_it_went_away():
    async def go():
        calls, sent = shared()
        (a, cancel_a), (b, cancel_b) = calls.call(Job("a")), calls.call(Job("b"))
        await asyncio.sleep(0)
        cancel_a()
        await asyncio.sleep(0)
        assert not sent[0].cancelled  # b still wants it
        cancel_b()
        await asyncio.sleep(0)
        assert sent[0].cancelled
        assert a.cancelled() and b.cancelled()
    run(go())


def test_a_timed_out_request_leaves_the_others_their_answers():
    async def go():
        calls, sent = shared()
        a, b = calls.call(Job("a"))[0], calls.call(Job("b"))[0]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(a, timeout=0.01)  # as the ingress's request timeout does
        assert not sent[0].cancelled
        sent[0].answer()
        assert await b == "vector of b"
    run(go())


def test_a_request_cancelled_before_its_turn_ends_is_never_sent():
    async def go():
        calls, sent = shared()
        _, cancel = calls.call(Job("a"))
        b = calls.call(Job("b"))[0]
        cancel()
        await asyncio.sleep(0)
        assert [(s.jobs, s.many) for s in sent] == [(["b"], False)]
        sent[0].answer()
        assert await b == "vector of b"
    run(go())


def test_the_calls_own_failure_reaches_every_request_in_it():
    async def go():
        calls, sent = shared()
        waits = [calls.call(Job(job))[0] for job in ("a", "b")]
        await asyncio.sleep(0)
        sent[0].future.set_exception(ConnectionError("replica died"))
        for wait in waits:
            with pytest.raises(ConnectionError, match="replica died"):
                await wait
    run(go())


def test_a_sender_that_raises_at_once_fails_the_requests_instead_of_leaving_them_waiting():
    async def go():
        def refuse(_):
            raise RuntimeError("no replicas")

        calls = SharedCalls(refuse, refuse)
        waits = [calls.call(Job(job))[0] for job in ("a", "b")]
        for wait in waits:
            with pytest.raises(RuntimeError, match="no replicas"):
                await asyncio.wait_for(wait, timeout=1)
    run(go())


def test_a_long_request_goes_alone_at_once_while_short_ones_of_its_turn_share():
    async def go():
        calls, sent = shared()
        long = EmbedJob(texts=["word " * (SHARED_MAX_CHARS // 5 + 1)])
        pairs = RerankJob("a query", ["a document " * 40])
        assert long.chars > SHARED_MAX_CHARS and pairs.chars > SHARED_MAX_CHARS
        waits = [calls.call(Job("a"))[0], calls.call(long)[0], calls.call(pairs)[0], calls.call(Job("b"))[0]]
        assert [(s.jobs, s.many) for s in sent] == [([long], False), ([pairs], False)]  # before the turn ends
        await asyncio.sleep(0)
        assert [(s.jobs, s.many) for s in sent[2:]] == [(["a", "b"], True)]
        for s in sent:
            s.answer()
        assert len(await asyncio.gather(*waits)) == 4
    run(go())


def test_a_replica_takes_what_its_bounds_leave_room_for_counted_in_requests():
    assert capacity_of(4, 4) == 8
    assert capacity_of(64, -1) is None  # Serve's -1: an unbounded queue
    assert room_for(8, holding=5, jobs=6) == 3
    assert room_for(8, holding=9, jobs=2) == 0
    assert room_for(None, holding=10_000, jobs=7) == 7
