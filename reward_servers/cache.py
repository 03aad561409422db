"""A score cache: an item scored once is not scored again by the same scorer and version.

The key is a BLAKE2b digest of the scorer's namespace (name, version, model id) and every input the
score depends on: the decoded pixels (shape, dtype and bytes) of the edit, the source, the mask and
each exemplar, the instruction and the metadata (JSON with sorted keys). Decoded pixels, not wire
bytes, so the same edit sent as PNG and as raw pixels is one entry. Only successful outcomes are
kept; a failed item is scored again next time. Repeated evaluation and SPO pools with repeated
candidates then cost one hash per item instead of a forward pass.

The cache lives in the `DynamicBatcher`, so the gRPC service and the Redis consumer share it. Its hits,
misses and hit ratio are exported as `spie_reward_cache_hits_total`, `spie_reward_cache_misses_total`
and `spie_reward_cache_hit_ratio`.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

import numpy as np


def item_key(namespace: str, fields: tuple[Any, ...]) -> bytes:
    """16-byte digest of one item's (edited, source, instruction, mask, exemplars, metadata)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(namespace.encode())

    def add(tag: bytes, value: Any) -> None:
        h.update(tag)
        if value is None:
            h.update(b"none")
        elif isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        else:
            data = json.dumps(value, sort_keys=True, default=str).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    edited, source, instruction, mask, exemplars, metadata = fields[:6]
    add(b"e", edited)
    add(b"s", source)
    add(b"i", instruction)
    add(b"m", mask)
    for exemplar in exemplars or ():
        add(b"x", exemplar)
    add(b"d", metadata or {})
    return h.digest()


class ScoreCache:
    """A least-recently-used map from item keys to outcomes, at most `max_items` entries.

    Used from the batcher's event loop only (no lock). Counts hits and misses.
    """

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"cache max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self._entries: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, key: bytes) -> Any | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
