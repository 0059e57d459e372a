"""LatestWinsRunner with real threads and a real asyncio loop."""

import asyncio
import threading
import time

from engine.latest_wins import Cancelled, LatestWinsRunner, Status


def _slow(value, seconds=0.05):
    def job(cancel: threading.Event):
        time.sleep(seconds)
        return value
    return job


def test_fifty_rapid_requests_deliver_only_the_last():
    runner = LatestWinsRunner()

    async def drag():
        tasks = []
        for i in range(50):
            tasks.append(asyncio.ensure_future(runner.submit(_slow(i))))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(drag())
    delivered = [o for o in outcomes if o.ok]
    assert [o.value for o in delivered] == [49]
    assert all(o.status is Status.SUPERSEDED for o in outcomes[:-1])
    assert runner.started <= 3
    runner.shutdown()


def test_running_steps_are_cancelled_within_one_step():
    runner = LatestWinsRunner()
    step_s = 0.1
    steps_done = []

    def ten_steps(cancel: threading.Event):
        for i in range(10):
            if cancel.is_set():
                raise Cancelled
            time.sleep(step_s)
            steps_done.append(i)
        return "done"

    async def scenario():
        long = asyncio.ensure_future(runner.submit(ten_steps))
        await asyncio.sleep(0.25)
        t0 = time.perf_counter()
        quick = await runner.submit(_slow("new", 0.0))
        return await long, quick, time.perf_counter() - t0

    long, quick, waited = asyncio.run(scenario())
    assert long.status is Status.SUPERSEDED and quick.value == "new"
    assert waited < 2 * step_s and len(steps_done) < 5
    runner.shutdown()


def test_errors_come_back_as_outcomes_and_the_runner_keeps_serving():
    runner = LatestWinsRunner()

    def broken(cancel):
        raise RuntimeError("model exploded")

    async def scenario():
        return await runner.submit(broken), await runner.submit(_slow(7, 0.0))

    bad, good = asyncio.run(scenario())
    assert bad.status is Status.ERROR and "model exploded" in bad.error
    assert good.ok and good.value == 7
    runner.shutdown()
