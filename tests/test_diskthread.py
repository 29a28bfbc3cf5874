# The group commit's disk thread (kv/diskthread.py): a real thread, driven from trio.
import threading

import pytest
import trio
import trio.testing

from kv.diskthread import DiskThread


async def test_a_call_runs_in_the_thread_and_returns_or_raises_what_it_did():
    with DiskThread() as disk:
        assert await disk.call(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (
            5, "tasknet-disk")
        with pytest.raises(KeyError, match="missing"):
            await disk.call({}.__getitem__, "missing")
        assert await disk.call(len, "after an error") == 14  # the thread goes on

        class Interrupted(BaseException):
            pass

        def interrupted() -> None:
            raise Interrupted

        with pytest.raises(Interrupted):  # not only Exceptions come back
            await disk.call(interrupted)
        assert await disk.call(len, "and on") == 6


async def test_a_cancelled_caller_still_waits_for_its_call_and_gets_its_result():
    release = threading.Event()
    finished = []

    def slow() -> str:
        release.wait(10)
        finished.append(True)
        return "written"

    with DiskThread() as disk:
        outcome = []
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                outcome.append(await disk.call(slow))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # the cancellation was delivered
            assert not outcome and not finished  # and did not end the wait
            release.set()
        assert finished == [True] and outcome == ["written"]


async def test_one_call_at_a_time_and_none_after_stop():
    gate = threading.Event()
    disk = DiskThread()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.call, gate.wait, 10)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="one call at a time"):
                await disk.call(len, "")
            with pytest.raises(RuntimeError, match="while a call runs"):
                disk.stop()
            gate.set()
    finally:
        disk.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await disk.call(len, "")
    disk.stop()  # twice is harmless
