"""Which token prefixes have their keys/values kept on the device, within a byte budget.

Host bookkeeping only: an entry pairs the token ids of a prefix with an opaque handle to its
keys/values (a `batching.Prefix`) and the bytes the handle holds. `lookup` finds the entry that
shares the longest prefix with a prompt: any entry helps up to the first token where it
differs, since a position's keys and values depend on the tokens up to it alone. The least
recently used entries are evicted when a new one would pass the budget.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Entry:
    tokens: np.ndarray  # int32 [n]
    handle: Any
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """LRU map of token prefixes to device keys/values, at most `budget_bytes` in all.

    Args:
      budget_bytes: device bytes the entries may hold together (0 disables the cache).
      min_tokens: shorter prefixes are neither stored nor reused (not worth a copy).
    """

    def __init__(self, budget_bytes: int, min_tokens: int = 16):
        self.budget = int(budget_bytes)
        self.min_tokens = min_tokens
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int], limit: int) -> tuple[int, Any]:
        """(length, handle) of the longest cached prefix of `prompt`, at most `limit` tokens;
        (0, None) if none reaches `min_tokens`. The entry becomes the most recently used."""
        if not self._entries or limit < self.min_tokens:
            return 0, None
        p = np.asarray(prompt[:limit], np.int32)
        best, best_key = 0, None
        for key, e in self._entries.items():
            n = common_prefix(p, e.tokens)
            if n > best:
                best, best_key = n, key
        if best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key].handle

    def wants(self, tokens: Sequence[int], nbytes: int) -> bool:
        """Whether storing `tokens` would add anything (checked before copying them out)."""
        if len(tokens) < self.min_tokens or nbytes > self.budget:
            return False
        t = np.asarray(tokens, np.int32)
        for e in self._entries.values():
            if len(e.tokens) >= len(t) and common_prefix(t, e.tokens) == len(t):
                return False  # already covered by a longer (or equal) entry
        return True

    def store(self, tokens: Sequence[int], handle: Any, nbytes: int) -> list[Any]:
        """Keep `handle` for `tokens`; returns the handles dropped (superseded or evicted),
        for the caller to free."""
        if nbytes > self.budget:
            return [handle]  # would not fit even alone: keep what is there
        t = np.asarray(tokens, np.int32)
        dropped = []
        for key in [k for k, e in self._entries.items()
                    if len(e.tokens) <= len(t) and common_prefix(t, e.tokens) == len(e.tokens)]:
            dropped.append(self._pop(key))  # a prefix of the new entry: superseded
        while self.nbytes + nbytes > self.budget:
            dropped.append(self._pop(next(iter(self._entries))))
        self._entries[self._next] = Entry(t, handle, nbytes)
        self._next += 1
        self.nbytes += nbytes
        return dropped

    def clear(self) -> list[Any]:
        return [self._pop(k) for k in list(self._entries)]

    def _pop(self, key: int) -> Any:
        e = self._entries.pop(key)
        self.nbytes -= e.nbytes
        return e.handle
