"""A bounded, thread-safe least-recently-used map."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """At most `max_entries` entries; past that the least recently used go.

    Callers can bring any number of keys (a /setup per project, a key per
    Label Studio), so every map filled from requests needs a bound.
    """

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value, without counting as a use."""
        with self._lock:
            return self._entries.get(key, default)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value; counts as a use."""
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            self._evict()

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        """The value, made by `create` (under the lock) when missing; counts as a use."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            value = self._entries[key] = create()
            self._evict()
            return value

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
