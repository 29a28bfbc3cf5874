# Helpers for the smoke tests of the scripts in benchmarks/: run one as a subprocess in a
# process group of its own, kill that whole group if it times out or fails, and read the one
# JSON line it prints. The figures themselves are checked by the tests, not here.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line holds `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group `pgid` (none left is fine)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_script(script: str, *args: str, timeout: float = 60,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run benchmarks/<script> to its end; it must exit 0. Whatever it started is killed
    with it when it times out or fails. After a clean exit its group is left alone, so that
    a test can still see processes the script should have stopped itself."""
    command = [sys.executable, str(BENCHMARKS / script), *args]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=None if env is None else dict(env))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc.pid)
        proc.communicate()
        raise
    if proc.returncode != 0:
        kill_group(proc.pid)
    assert proc.returncode == 0, f"{script} failed:\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_benchmark(script: str, *args: str, timeout: float = 60,
                  env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run benchmarks/<script> (see `run_script`); its output must be one line of JSON
    holding an object, which is returned."""
    stdout = run_script(script, *args, timeout=timeout, env=env).stdout
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"{script} must print one line, printed: {stdout!r}"
    figures = json.loads(lines[0])
    assert isinstance(figures, dict), figures
    return figures
