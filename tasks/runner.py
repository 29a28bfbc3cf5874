# Running task author code from the node (trio side): one call, under a deadline, isolated
# so that a task's exception, hang or oversized answer fails that call for that round only.
# Lives here: `run_task_call` and its outcome type, the submission size check.
# Must not live here: deciding what to call when (engine.py), the task API (api.py).
from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .api import MAX_SUBMISSION_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallResult:
    """The outcome of one task call: `ok` with its `value`, or a failure with `error`."""

    ok: bool
    value: Any = None
    error: str = ""  # "timeout", "oversized: ...", "submission must be ...", or the exception
    traceback: str = ""


def check_submission(value: Any) -> str | None:
    """Why `value` is not an acceptable submission (None when it is)."""
    if not isinstance(value, str):
        return f"submission must be a str, got {type(value).__name__}"
    size = len(value.encode("utf-8"))
    if size > MAX_SUBMISSION_BYTES:
        return f"oversized: submission is {size} bytes, the limit is {MAX_SUBMISSION_BYTES}"
    return None


def _boxed(fn: Callable[..., Any], *args: Any) -> list[Any]:
    return [fn(*args)]


async def run_task_call(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float,
    name: str = "",
    is_submission: bool = False,
    logger: logging.Logger | None = None,
) -> CallResult:
    """Call task code `fn(*args)` and return its outcome; never raises (but Cancelled).

    A coroutine function is awaited under `timeout` seconds. Any other callable runs in a
    worker thread (trio.to_thread.run_sync with abandon_on_cancel): past the deadline the
    thread is abandoned, not joined, so a hung task cannot block the node (the thread keeps
    running until it returns by itself; its result is dropped). If a sync function returns
    an awaitable, that is awaited too, in the remaining time. With `is_submission`, a value
    that is not a str of at most 512 UTF-8 bytes is a failure ("oversized" when too long).
    """
    logger = logger or log
    label = name or getattr(fn, "__qualname__", repr(fn))
    try:
        with trio.fail_after(timeout):
            if inspect.iscoroutinefunction(fn):
                value = await fn(*args)
            else:
                # trio-typing's stubs predate `abandon_on_cancel` (trio >= 0.23 has it)
                # boxed: trio refuses a thread's result that is a coroutine
                boxed = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    functools.partial(_boxed, fn, *args), abandon_on_cancel=True
                )
                value = boxed[0]
            if inspect.isawaitable(value):
                value = await value
    except trio.TooSlowError:
        logger.warning("task call %s timed out after %.3f s", label, timeout)
        return CallResult(False, error="timeout")
    except Exception as e:
        tb = traceback.format_exc()
        logger.error("task call %s failed: %r\n%s", label, e, tb)
        return CallResult(False, error=f"{type(e).__name__}: {e}", traceback=tb)
    if is_submission:
        why = check_submission(value)
        if why is not None:
            logger.warning("task call %s: %s", label, why)
            return CallResult(False, error=why)
    return CallResult(True, value=value)
