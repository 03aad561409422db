"""Per-scorer queue figures for `spie queue stats`: stream length, pending, replicas, dead letters,
throughput (completed jobs per second, from two samples of each scorer's `done` counter).

Replicas are the live entries of the scorer's presence hash (`presence.live_replicas`): a replica
counts from its start, before its first job, and stops counting once it exits or misses its
heartbeats."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis

from reward_servers.queue import protocol as P
from reward_servers.queue.presence import live_replicas

ACTIVE_IDLE_MS = 60_000  # a consumer that talked to Redis within this long counts as active


@dataclass
class ScorerStats:
    scorer: str
    stream_length: int  # jobs waiting or being scored
    pending: int  # jobs delivered to a replica and not yet acknowledged
    consumers: int  # replicas known to the group
    active_consumers: int  # of which seen in the last minute
    replicas: int  # live replicas (registered, heartbeat within its TTL), draining ones included
    draining: int  # of which finishing their jobs before they exit
    last_scaling: dict | None  # an autoscaler's last event ({"action", "to", ..., "age_s"}), if any
    dead_letters: int  # entries in the dead-letter stream
    completed: int  # jobs completed since the stream was created
    throughput: float  # jobs completed per second over the sampling interval

    def as_dict(self) -> dict:
        return asdict(self)


def scorer_names(client: redis.Redis) -> list[str]:
    """Scorers with a stream or a registered replica."""
    names = {n.decode() for n in client.smembers(P.SCORERS_KEY)}
    for key in client.scan_iter(match="spie:q:*:jobs", count=1000):
        names.add(key.decode()[len("spie:q:") : -len(":jobs")])
    return sorted(names)


def _snapshot(client: redis.Redis, scorer: str) -> ScorerStats:
    stream = P.jobs_key(scorer)
    pending = consumers = active = 0
    try:
        for group in client.xinfo_groups(stream):
            if group["name"] in (P.GROUP, P.GROUP.encode()):
                pending, consumers = int(group["pending"]), int(group["consumers"])
        if consumers:
            active = sum(c["idle"] < ACTIVE_IDLE_MS for c in client.xinfo_consumers(stream, P.GROUP))
    except redis.ResponseError:  # no stream or group yet
        pass
    live = live_replicas(client, scorer)
    last = None
    for entry_id, fields in client.xrevrange(P.scaling_key(scorer), count=1):
        last = json.loads(fields[b"event"])
        last["age_s"] = round(max(0.0, time.time() - P.entry_ms(entry_id.decode()) / 1000), 1)
    return ScorerStats(
        scorer=scorer,
        stream_length=client.xlen(stream),
        pending=pending,
        consumers=consumers,
        active_consumers=active,
        replicas=len(live),
        draining=sum(bool(e.get("draining")) for e in live.values()),
        last_scaling=last,
        dead_letters=client.xlen(P.dead_key(scorer)),
        completed=int(client.get(P.done_key(scorer)) or 0),
        throughput=0.0,
    )


def collect(client: redis.Redis, interval_s: float = 1.0) -> list[ScorerStats]:
    """Figures for every scorer; throughput is measured over `interval_s` (0: not measured)."""
    names = scorer_names(client)
    first = {name: _snapshot(client, name) for name in names}
    if interval_s <= 0:
        return list(first.values())
    start = time.monotonic()
    time.sleep(interval_s)
    out = []
    for name in names:
        now = _snapshot(client, name)
        now.throughput = max(0, now.completed - first[name].completed) / (time.monotonic() - start)
        out.append(now)
    return out


def _scaled(event: dict | None) -> str:
    """The last scaling event, short: "up->4,12s" (to 4 replicas, 12 s ago); "-" when none."""
    if not event:
        return "-"
    to = f"->{event['to']}" if "to" in event else ""
    return f"{event.get('action', '?')}{to},{event.get('age_s', 0):.0f}s"


def format_table(rows: list[ScorerStats]) -> str:
    header = ("scorer", "stream", "pending", "replicas", "dead", "completed", "items/s", "scaled")
    lines = [header]
    for r in rows:
        replicas = f"{r.replicas} ({r.draining} draining)" if r.draining else str(r.replicas)
        lines.append(
            (
                r.scorer,
                str(r.stream_length),
                str(r.pending),
                replicas,
                str(r.dead_letters),
                str(r.completed),
                f"{r.throughput:.1f}",
                _scaled(r.last_scaling),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )
