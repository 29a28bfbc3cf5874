# The tasks shipped with tasknet, by name (the `name` a task is created with).
# Lives here: the registry only; each task lives in its own module.
from __future__ import annotations

from ..api import Task
from .hello import HelloWorld
from .storage import StorageProof

BUILTIN: dict[str, type[Task]] = {
    HelloWorld.name: HelloWorld,
    StorageProof.name: StorageProof,
}


def builtin_task(name: str) -> type[Task]:
    """The built-in task class called `name`; KeyError naming the known ones otherwise."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise KeyError(f"no built-in task {name!r} (known: {sorted(BUILTIN)})") from None


__all__ = ["BUILTIN", "HelloWorld", "StorageProof", "builtin_task"]
