# Installing task code that does not ship with tasknet: a Python file whose Task subclasses a
# node may run (`node.py --task-module FILE`). Lives here: loading such a file under a module
# name of its own and collecting the tasks it defines, with one-line errors. Must not live
# here: running tasks (runner.py, driver.py) or deciding whether to (the code hash check in
# api.py, done against the chain's record before a node runs a task).
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from .api import Task


class TaskModuleError(Exception):
    """A task module cannot be loaded or defines no usable task."""


def load_task_module(path: str | Path) -> dict[str, type[Task]]:
    """The tasks (Task subclasses, by their `name`) that the file at `path` defines."""
    path = Path(path).resolve()
    if not path.is_file():
        raise TaskModuleError(f"task module {path}: no such file")
    module_name = "tasknet_task_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskModuleError(f"task module {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # code_hash reads the source through the module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskModuleError(f"task module {path}: {type(exc).__name__}: {exc}") from None
    found: dict[str, type[Task]] = {}
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Task) and value is not Task \
                and value.__module__ == module_name:
            if value.name in found:
                raise TaskModuleError(f"task module {path}: two tasks named {value.name!r}")
            found[value.name] = value
    if not found:
        raise TaskModuleError(f"task module {path}: defines no Task subclass")
    return found


def load_task_modules(paths: list[str], builtin: dict[str, type[Task]]) -> dict[str, type[Task]]:
    """Every task of these files, refusing a name taken by a built-in task or another file."""
    tasks: dict[str, type[Task]] = {}
    for path in paths:
        for name, cls in load_task_module(path).items():
            if name in builtin or name in tasks:
                raise TaskModuleError(f"task module {path}: a task named {name!r} is "
                                      f"already installed")
            tasks[name] = cls
    return tasks
