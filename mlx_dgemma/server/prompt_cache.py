"""Encoded prompt prefixes kept between requests (a conversation's earlier turns, a shared system prompt).

Entries are snapshots of a one-row cache (references to its arrays, which are replaced and never modified as a
cache grows, so a snapshot costs no copy). A request starts from the longest entry that is a prefix of its prompt.
Least recently used entries go first once there are more than `max_entries` or they hold more than `max_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict



def _nbytes(snapshot) -> int:
    _, mask, layers = snapshot
    arrays = [a for kv in layers for a in kv if a is not None] + ([mask] if mask is not None else [])
    return sum(a.nbytes for a in arrays)


class PromptCache:
    def __init__(self, max_entries: int = 16, max_bytes: int = 2 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # ids -> (snapshot, bytes)
        self.hits = 0

    def __len__(self):
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def restore(self, cache, ids: list[int]) -> int:
        """Load the longest stored prefix of `ids` into the empty `cache`; returns its length (0 on a miss)."""
        best = None
        for key in self._entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and tuple(ids[:len(key)]) == key:
                best = key
        if best is None:
            return 0
        self._entries.move_to_end(best)
        cache.restore(self._entries[best][0])
        self.hits += 1
        return len(best)

    def store(self, ids: list[int], cache):
        if self.max_entries <= 0:
            return
        snapshot = cache.snapshot()
        key = tuple(ids)
        self._entries[key] = (snapshot, _nbytes(snapshot))
        self._entries.move_to_end(key)
        while self._entries and (len(self._entries) > self.max_entries or self.nbytes > self.max_bytes):
            self._entries.popitem(last=False)
