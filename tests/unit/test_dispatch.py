"""The ingress's GroupDispatcher: images travel several per call, each still
answered on its own, by its own deadline (deployments/dispatch.py)."""
import asyncio
import time

from deployments.dispatch import GroupDispatcher
from mmdet_ls.failures import TaskFailure


class FakeGraph:
    """Stands in for the three deployment calls: `send` returns the chain's
    responses, the last one resolving to one result per item after the
    slowest item's delay (delays per item: ("slow", 2.0) waits 2 s)."""

    def __init__(self, fail_sources=()):
        self.calls: list[list] = []
        self.in_flight = self.max_in_flight = 0
        self.fail_sources = set(fail_sources)

    def send(self, items: list) -> list:
        self.calls.append(list(items))
        return [self._run(items)]

    async def _run(self, items):
        self.in_flight += len(items)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(max(delay for _, delay in items))
            if any(name in self.fail_sources for name, _ in items):
                raise RuntimeError("replica gone")
            return [f"result of {name}" for name, _ in items]
        finally:
            self.in_flight -= len(items)


def run(coro):
    return asyncio.run(coro)


def test_a_lone_image_leaves_at_once_in_a_group_of_one():
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=64)
        result = await dispatcher.submit(("a", 0.0), "http://x", 1, time.monotonic() + 5)
        return graph, result

    graph, result = run(main())
    assert result == "result of a"
    assert graph.calls == [[("a", 0.0)]]


def test_many_images_of_one_request_travel_in_few_calls_and_answer_in_order():
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=64)  # a queue splits into 8 groups
        deadline = time.monotonic() + 5
        results = await asyncio.gather(*(dispatcher.submit((f"img{i}", 0.01), "relative", i, deadline)
                                         for i in range(64)))
        return graph, results

    graph, results = run(main())
    assert results == [f"result of img{i}" for i in range(64)]
    assert len(graph.calls) == 8, [len(c) for c in graph.calls]  # 64 images, 8 calls of 8
    assert sorted(name for call in graph.calls for name, _ in call) == sorted(f"img{i}" for i in range(64))


def test_images_in_flight_stay_within_the_limit_and_calls_hold_at_most_16():
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=32)
        deadline = time.monotonic() + 10
        await asyncio.gather(*(dispatcher.submit((f"i{i}", 0.005), "relative", i, deadline) for i in range(300)))
        return graph

    graph = run(main())
    assert graph.max_in_flight <= 32
    assert max(len(c) for c in graph.calls) <= 16
    assert sum(len(c) for c in graph.calls) == 300


def test_a_slow_server_delays_only_its_own_images():
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=64)
        deadline = time.monotonic() + 1.0
        slow = [dispatcher.submit((f"slow{i}", 5.0), "http://slow:1", i, deadline) for i in range(40)]
        fast = [dispatcher.submit((f"fast{i}", 0.0), "http://fast:2", 100 + i, deadline) for i in range(3)]
        started = time.monotonic()
        results = await asyncio.gather(*slow, *fast)
        return graph, results, time.monotonic() - started

    graph, results, elapsed = run(main())
    assert results[40:] == ["result of fast0", "result of fast1", "result of fast2"]
    for failure in results[:40]:
        assert isinstance(failure, TaskFailure) and failure.reason == "deadline"
    assert elapsed < 2.0
    for call in graph.calls:  # never a group that mixes servers
        assert len({name.rstrip("0123456789") for name, _ in call}) == 1, call


def test_a_failed_call_fails_its_images_only():
    async def main():
        graph = FakeGraph(fail_sources={"bad0"})
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=64)
        deadline = time.monotonic() + 1.0  # too little left for a retry
        return await asyncio.gather(dispatcher.submit(("bad0", 0.0), "http://bad", 1, deadline),
                                    dispatcher.submit(("good0", 0.0), "http://good", 2, deadline))

    bad, good = run(main())
    assert isinstance(bad, TaskFailure) and bad.retriable
    assert good == "result of good0"


def test_an_image_that_gave_up_while_queued_is_never_sent():
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=1)  # one image in flight
        long = dispatcher.submit(("first", 0.5), "relative", 1, time.monotonic() + 5)
        short = dispatcher.submit(("late", 0.0), "relative", 2, time.monotonic() + 0.1)
        first = asyncio.ensure_future(long)
        await asyncio.sleep(0)  # "first" leaves alone; "late" queues behind it
        late = await short
        await first
        return graph, late

    graph, late = run(main())
    assert isinstance(late, TaskFailure) and late.reason == "deadline"
    assert all(name != "late" for call in graph.calls for name, _ in call)


def test_a_source_has_at_most_its_calls_in_flight_and_its_queue_then_travels_together():
    # max_inflight_images 16: 16 / IMAGES_PER_BUSY_GROUP (8) = 2 calls per source.
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=16)
        deadline = time.monotonic() + 5
        first = [asyncio.ensure_future(dispatcher.submit((f"a{i}", 0.2), "relative", i, deadline)) for i in range(2)]
        await asyncio.sleep(0.05)  # both left alone, one call each; now one-image requests keep arriving
        later = [asyncio.ensure_future(dispatcher.submit((f"b{i}", 0.2), "relative", 10 + i, deadline))
                 for i in range(6)]
        await asyncio.sleep(0.05)
        calls_while_busy = len(graph.calls)
        other = await dispatcher.submit(("x0", 0.0), "http://other:1", 99, deadline)  # its own slots
        results = await asyncio.gather(*first, *later)
        return graph, calls_while_busy, other, results

    graph, calls_while_busy, other, results = run(main())
    assert calls_while_busy == 2, graph.calls  # the six wait: the source's two calls are out
    assert other == "result of x0"
    assert results == [f"result of a{i}" for i in range(2)] + [f"result of b{i}" for i in range(6)]
    relative = [[name for name, _ in call] for call in graph.calls if not call[0][0].startswith("x")]
    assert relative[:2] == [["a0"], ["a1"]]
    # The six queued images left in the two calls that freed up, not in six calls.
    assert 1 <= len(relative[2:]) <= 2 and sorted(n for c in relative[2:] for n in c) == [f"b{i}" for i in range(6)]


def test_more_given_up_images_than_one_scan_never_hold_up_another_source():
    # max_inflight_images 8: one call per source. Source "stuck" has its call out for 2 s and
    # 300 more images queued (more than MAX_SCAN) that give up after 50 ms; an image of another
    # source queued behind them must leave at once, not when the stuck call ends.
    async def main():
        graph = FakeGraph()
        dispatcher = GroupDispatcher(graph.send, max_inflight_images=8)
        now = time.monotonic()
        stuck = asyncio.ensure_future(dispatcher.submit(("stuck0", 2.0), "http://stuck", 0, now + 5))
        await asyncio.sleep(0)
        dead = [asyncio.ensure_future(dispatcher.submit((f"dead{i}", 0.0), "http://stuck", i, now + 0.05))
                for i in range(300)]
        await asyncio.gather(*dead)
        start = time.monotonic()
        other = await dispatcher.submit(("other", 0.0), "http://other", 999, time.monotonic() + 5)
        waited = time.monotonic() - start
        stuck.cancel()
        return graph, other, waited, await asyncio.gather(*dead)

    graph, other, waited, dead = run(main())
    assert all(isinstance(d, TaskFailure) and d.reason == "deadline" for d in dead)
    assert other == "result of other" and waited < 1.0, waited
    assert not [name for call in graph.calls for name, _ in call if name.startswith("dead")]
