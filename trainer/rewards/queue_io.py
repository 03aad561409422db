"""Helpers of the queue client (`trainer.rewards.queue`): per-call socket timeouts, chunked deletes
and submissions, and the summaries its errors print."""

from __future__ import annotations

from collections.abc import Sequence

from protos.spie.reward.v1 import reward_pb2 as pb

# Most bytes of blobs one submission call carries (Redis buffers a call's arguments whole).
SUBMIT_CHUNK_BYTES = 64 * 2**20


def chunks(indices: list[int], size, limit: int = SUBMIT_CHUNK_BYTES, most: int = 256) -> list[list[int]]:
    """`indices` in runs of at most `most` whose `size(i)` add up to at most `limit` (a larger one alone)."""
    out, current, used = [], [], 0
    for i in indices:
        if current and (used + size(i) > limit or len(current) >= most):
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += size(i)
    if current:
        out.append(current)
    return out


def delete(pipe, names: list[str]) -> None:
    for start in range(0, len(names), 1000):
        pipe.delete(*names[start : start + 1000])


def set_timeout(client, seconds: float) -> None:
    """Set the socket timeout of every connection of `client`'s pool (and of new ones) to `seconds`,
    so the next call cannot block longer (redis-py has no per-call timeout)."""
    pool = client.connection_pool
    pool.connection_kwargs["socket_timeout"] = seconds
    pool.connection_kwargs["socket_connect_timeout"] = seconds
    for conn in [*getattr(pool, "_available_connections", []), *getattr(pool, "_in_use_connections", [])]:
        conn.socket_timeout = seconds
        conn.socket_connect_timeout = seconds
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            sock.settimeout(seconds)
        parser = getattr(conn, "_parser", None)  # it restores its own copy after a non-blocking peek
        if getattr(parser, "_buffer", None) is not None and hasattr(parser._buffer, "socket_timeout"):
            parser._buffer.socket_timeout = seconds
        if hasattr(parser, "_socket_timeout"):
            parser._socket_timeout = seconds


def summary(by_scorer: dict[str, list[int]], items: Sequence[pb.Item], shown: int = 8) -> str:
    """ "scorer 'x': 3 of 16 items (a, b, c)" for each scorer with indices."""
    parts = []
    for scorer, indices in by_scorer.items():
        if indices:
            names = [items[i].id or f"#{i}" for i in indices[:shown]]
            more = f", ... {len(indices) - shown} more" if len(indices) > shown else ""
            parts.append(
                f"scorer {scorer!r}: {len(indices)} of {len(items)} items ({', '.join(names)}{more})"
            )
    return "; ".join(parts)
