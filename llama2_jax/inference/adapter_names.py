"""Which LoRA adapters a server holds: name -> index in the slots' adapter stack, and how many
requests use each. Plain Python, thread-safe: HTTP handlers look names up, the device thread
loads, and an adapter unloaded while requests still use it keeps its index until they end.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading


class UnknownAdapter(LookupError):
    """No adapter of that name is loaded (HTTP 404, as for an unknown model)."""


class AdapterConflict(ValueError):
    """The name is taken, or every index of the stack is in use (HTTP 400)."""


@dataclasses.dataclass(eq=False)
class Loaded:
    """An adapter in the stack. `generation` is unique per load: prefixes cached under one
    load are never reused by another (its keys and values are another model's)."""

    name: str
    index: int
    directory: str
    generation: int
    ready: bool = False  # loaded on the devices: requests may use it
    users: int = 0  # requests holding it
    unloaded: bool = False


class AdapterNames:
    """The adapters of a stack with `capacity` indices (1..capacity; 0 is the base)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._by_name: dict[str, Loaded] = {}
        self._by_index: dict[int, Loaded] = {}  # loading, loaded, or unloaded but still used
        self._generations = itertools.count(1)

    def names(self) -> list[tuple[str, str]]:
        """(name, directory) of the adapters requests may use, in load order."""
        with self._lock:
            return [(e.name, e.directory) for e in self._by_name.values() if e.ready]

    def reserve(self, name: str, directory: str) -> Loaded:
        """An index for `name` (not usable until `ready`); AdapterConflict if the name is
        taken or no index is free."""
        with self._lock:
            if name in self._by_name:
                raise AdapterConflict(f"an adapter named '{name}' is already loaded")
            free = [i for i in range(1, self.capacity + 1) if i not in self._by_index]
            if not free:
                draining = sum(e.unloaded for e in self._by_index.values())
                raise AdapterConflict(
                    f"all {self.capacity} adapter slots (max_loras) are in use"
                    + (f" ({draining} unloaded, still finishing requests)" if draining else "")
                    + ": unload one first")
            entry = Loaded(name, free[0], directory, next(self._generations))
            self._by_name[name] = self._by_index[entry.index] = entry
            return entry

    def ready(self, entry: Loaded) -> None:
        with self._lock:
            entry.ready = True

    def abort(self, entry: Loaded) -> None:
        """A reservation whose load failed: its name and index are free again."""
        with self._lock:
            self._by_name.pop(entry.name, None)
            self._by_index.pop(entry.index, None)

    def acquire(self, name: str) -> Loaded:
        """The adapter `name`, held by one more request (`release` it when done)."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None or not entry.ready:
                raise UnknownAdapter(name)
            entry.users += 1
            return entry

    def release(self, entry: Loaded) -> None:
        with self._lock:
            entry.users -= 1
            if entry.unloaded and entry.users == 0:
                self._by_index.pop(entry.index, None)

    def unload(self, name: str) -> None:
        """New requests can no longer name it; its index frees when the last one using it
        ends. UnknownAdapter if no such adapter is loaded."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None or not entry.ready:
                raise UnknownAdapter(name)
            del self._by_name[name]
            entry.unloaded = True
            if entry.users == 0:
                self._by_index.pop(entry.index, None)
