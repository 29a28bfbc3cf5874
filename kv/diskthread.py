# One long-lived thread that runs blocking disk calls (the group commit's synced LevelDB write)
# for one trio task, one call at a time, and wakes that task through a pipe the event loop polls.
# Lives here: that thread, its start and stop, and the hand-over of a call and its outcome.
# Must not live here: what the calls do (kv/writer.py decides), any other concurrency.
#
# Why not trio.to_thread.run_sync: on this class of machine (2 shared virtual cores) a hand-over
# through it cost 204-232 us of CPU in our runs (capacity limiter, cancel scope, thread cache,
# the run-soon queue and its wake-up socket), as much as the small synced write it carries, and
# the writer makes one per group commit, hundreds per second under single writes. A queue and a
# pipe cost 145-154 us (`python benchmarks/diskthread.py` measures both in the same run).
from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long stop() waits for the thread to end (it is idle by then)


class DiskThread:
    """Runs `await call(fn, *args)` in a worker thread; one caller at a time.

    A call cannot be abandoned: once handed over, the caller waits for the outcome even when
    it is cancelled, and gets it, as if fn had run in the event loop (the cancellation takes
    effect at the caller's next checkpoint). So a shutdown never leaves a disk write running
    behind a closed store, nor a written batch unaccounted. Use as `with DiskThread() as disk:`;
    leaving the block stops the thread."""

    def __init__(self, name: str = "tasknet-disk") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._outcome: tuple[bool, Any] = (True, None)
        self._busy = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._wake_read, self._wake_write = os.pipe()
        try:
            os.set_blocking(self._wake_read, False)
            self._thread.start()
        except BaseException:
            self._close_pipe()
            raise

    def __enter__(self) -> DiskThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                self._outcome = (True, fn(*args))
            except BaseException as exc:  # handed to the caller, who re-raises it
                self._outcome = (False, exc)
            os.write(self._wake_write, b".")

    @trio.lowlevel.enable_ki_protection  # a Ctrl-C between hand-over and wake-up would leave
    # the call's byte in the pipe for the next call to take as its own
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the thread; its result, or its exception raised here."""
        if self._busy:
            raise RuntimeError("DiskThread runs one call at a time")
        if not self._thread.is_alive():
            raise RuntimeError("DiskThread is stopped")
        self._busy = True
        try:
            self._jobs.put((fn, args))
            with trio.CancelScope(shield=True):
                while True:
                    try:
                        os.read(self._wake_read, 1)
                        break
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self._wake_read)
        finally:
            self._busy = False
        ok, value = self._outcome
        self._outcome = (True, None)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        """End the (idle) thread and close the pipe. Refused while a call runs: its caller
        waits on the pipe, and the only way to end the call is to wait for it."""
        if self._busy:
            raise RuntimeError("DiskThread.stop() while a call runs")
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                log.error("the disk thread did not stop within %.0f s", STOP_WAIT_S)
                return  # leave the pipe open: the thread still writes to it when it ends
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1
