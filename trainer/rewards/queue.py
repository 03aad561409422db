"""`RewardClient`: score rollout batches through the Redis queue fabric.

It offers the same `score(rollout) -> Scores` and `close()` as `InProcessRewards`, so the training
loop can use either. For one rollout batch it:

1. encodes each edit once as a `reward.proto` Item and stores it as a blob with a TTL (shared by
   every scorer; the last scorer to finish with it deletes it); with `blob_dir` (the blob path,
   reward_servers/queue/blobs.py) the bytes go to one file per batch in a shared folder and the
   blobs are references to them;
2. adds one job per (item, scorer) to that scorer's stream, keeping each stream at most
   `max_in_flight` jobs long (backpressure: a slow scorer slows submission, memory stays bounded);
3. gathers results, woken by the batch's signal list and checking every `poll_s` besides; each
   (item, scorer) result key is written once by whichever replica finished first, and anything seen
   twice is ignored;
4. after `deadline_s`, resubmits what is missing (`resubmits` times), then fails with a
   `RewardQueueError` naming the scorer and the items. It never waits past its deadlines: every
   Redis call gets at most the time left (`call_timeout_s` at most), nothing is retried after the
   deadline, and the diagnosis and cleanup after it get `GRACE_S` each, or are skipped when Redis
   did not answer.

Batch keys are unique per client (a random attempt id before the batch counter), so a resumed run
that reuses its run id never reads its predecessor's results. Each job carries the time left as a
duration (`budget_ms`, measured by replicas on Redis's clock, so clock skew does not matter) and its
submission round (`gen`: a resubmission is not counted as a failed delivery).

If Redis restarts meanwhile (its data gone), the client notices its batch marker is missing and
resubmits every unfinished job at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.queue import protocol as P
from reward_servers.queue.blobs import BlobError, BlobFolder, blob_dir
from reward_servers.queue.presence import live_replicas
from trainer.config.schema import DEFAULT_DEADLINE_S, QueueConfig
from trainer.errors import UserError
from trainer.rewards.queue_io import chunks, delete, set_timeout, summary
from trainer.rewards.scores import Scores

log = logging.getLogger("spie.reward_client")
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
# Seconds the diagnosis and the cleanup after a deadline may each take (one connection, one pipeline).
GRACE_S = 1.0


class _Late(Exception):
    """The deadline passed before the next Redis call (not a Redis failure)."""


class RewardQueueError(RuntimeError):
    """Scores could not be gathered in time; the message names the scorer(s) and the items."""


@dataclass(frozen=True)
class QueueClientConfig(QueueConfig):
    """The queue client's settings: the training YAML's `reward.queue` knobs plus where and for how long.

    `spie train` builds it from `reward.redis_url`, the run folder's name and `reward.deadline_s`.
    """

    # Redis URL (redis://, rediss://, unix://); empty: the REDIS_URL environment variable. The
    # password comes from the URL, the `password` argument or REDIS_PASSWORD.
    url: str = ""
    # Run id used in key names (letters, digits, '-', '_'); empty: a random one.
    run_id: str = ""
    # Seconds to gather one rollout batch before the missing jobs are resubmitted (the same default
    # as `reward.deadline_s`).
    deadline_s: float = DEFAULT_DEADLINE_S
    # Longest one Redis call may take, in seconds (also never more than the time left before the
    # deadline): a frozen Redis costs at most this past the deadline.
    call_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.poll_s <= 0 or self.call_timeout_s <= 0:
            raise UserError("queue: deadline_s, poll_s and call_timeout_s must be > 0")
        if self.resubmits < 0 or self.max_in_flight < 1 or self.blob_ttl_s < 1:
            raise UserError("queue: resubmits must be >= 0, max_in_flight and blob_ttl_s >= 1")
        if self.encoding not in ("raw", "png"):
            raise UserError(f"queue.encoding must be 'raw' or 'png', got {self.encoding!r}")


@dataclass
class GatherStats:
    """What happened while gathering the last batch."""

    submitted: int = 0  # jobs added to streams, resubmissions included
    resubmitted: int = 0  # of which resubmissions (after a deadline or a Redis restart)
    duplicates_ignored: int = 0  # results seen again for an (item, scorer) already gathered
    redis_errors: int = 0  # failed Redis calls that were retried
    max_stream_len: dict[str, int] = field(default_factory=dict)  # highest XLEN seen per scorer
    seconds: float = 0.0


class RewardClient:
    """Scores rollout batches with reward-server replicas through Redis.

    Args:
        scorers: scorer names, or a `trainer.config.RewardConfig` (its `scorers[*].name`).
        config: queue settings.
        password: Redis password when it is not in the URL (default: REDIS_PASSWORD).
    """

    def __init__(self, scorers, config: QueueClientConfig | None = None, password: str | None = None) -> None:
        self.config = config or QueueClientConfig()
        names = [getattr(s, "name", s) for s in getattr(scorers, "scorers", scorers)]
        if not names or len(set(names)) != len(names):
            raise UserError(f"reward client: scorer names must be given and unique, got {names}")
        self.scorers: list[str] = names
        url = P.redis_url(self.config.url)
        if not url:
            raise UserError("reward client: no Redis URL (set queue.url or REDIS_URL)")
        self.url = url
        self.run_id = self.config.run_id or secrets.token_hex(4)
        # Unique per client: a resumed run (same run id, batch counter from 1) or a second trainer
        # never shares a batch key, so a result can only answer the job that asked for it.
        self.attempt_id = secrets.token_hex(4)
        P.BatchKeys(self.run_id, "0")  # validates the run id
        # Per call: at most call_timeout_s, and at most the deadline (a blocking read waits less).
        self.call_timeout_s = min(self.config.call_timeout_s, max(0.5, self.config.deadline_s))
        self.redis = P.connect(
            url, password, socket_timeout=self.call_timeout_s, socket_connect_timeout=self.call_timeout_s
        )
        self.stats = GatherStats()
        self.totals: dict[str, int] = {}
        self._seq = 0
        self._higher: dict[str, bool] = {}
        self._stale: list[str] = []  # keys of gathered batches, deleted with the next round trip
        self.blob_folder = None  # the blob path: payloads in a shared folder, references in Redis
        if blob_dir(self.config.blob_dir):
            try:
                self.blob_folder = BlobFolder(blob_dir(self.config.blob_dir))
                self.blob_folder.sweep(self.config.blob_ttl_s)
            except (BlobError, OSError) as err:
                self.redis.close()
                raise UserError(str(err)) from err

    # ---- the InProcessRewards interface ---------------------------------------------------------

    def score(self, rollout) -> Scores:
        """Score a `sampler.rollout.Rollout` with every scorer; see `score_items`."""
        from reward_servers.images import make_item

        edited, sources = rollout.edited_uint8(), rollout.sources_uint8()
        masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
        ids = list(rollout.item_ids) or [f"i{i}" for i in range(len(edited))]
        items = [
            make_item(
                ids[i],
                edited[i],
                sources[i],
                rollout.instructions[i],
                None if masks is None else masks[i],
                encoding=self.config.encoding,
                metadata=None if rollout.metadata is None else rollout.metadata[i],
            )
            for i in range(len(edited))
        ]
        return self.score_items(items)

    def close(self) -> None:
        self._flush_stale()
        self.redis.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- gathering -------------------------------------------------------------------------------

    def score_items(self, items: Sequence[pb.Item]) -> Scores:
        """N x S scores of proto Items (NaN and an error for failed items), higher is better."""
        return self._to_scores(self.gather_results(items))

    def gather_results(self, items: Sequence[pb.Item], scorers: Sequence[str] | None = None):
        """scorer -> the N Results the replicas wrote (gradients included), for `scorers` (default all);
        `RewardQueueError` when some are still missing after the last resubmission's deadline."""
        names, start = list(scorers or self.scorers), time.monotonic()
        self._seq += 1
        keys = P.BatchKeys(self.run_id, f"{self.attempt_id}-b{self._seq}")
        blobs = [item.SerializeToString() for item in items]
        file = f"{keys.run}.{keys.batch}"
        if self.blob_folder is not None:  # Redis gets references, the folder the bytes
            self.blob_folder.sweep(self.config.blob_ttl_s)
            blobs = self.blob_folder.write(file, blobs)
        self.stats, self._gen = GatherStats(), 0
        self._answered = True  # did Redis answer the last call? (no diagnosis or cleanup if not)
        results: dict[str, list[pb.Result | None]] = {s: [None] * len(items) for s in names}
        try:
            for round_ in range(self.config.resubmits + 1):
                todo = {s: [i for i, r in enumerate(results[s]) if r is None] for s in names}
                if round_:
                    self._gen += 1
                    self.stats.resubmitted += sum(map(len, todo.values()))
                    log.warning("reward queue: resubmitting %s", summary(todo, items))
                self._round(keys, blobs, todo, results, time.monotonic() + self.config.deadline_s)
                if all(r is not None for rs in results.values() for r in rs):
                    break
            else:
                missing = {s: [i for i, r in enumerate(rs) if r is None] for s, rs in results.items()}
                raise RewardQueueError(
                    f"reward queue at {P.describe(self.url)}: no result after "
                    f"{self.config.resubmits + 1} x {self.config.deadline_s:g}s for {summary(missing, items)}"
                    f"{self._diagnose(missing)}"
                )
        finally:
            done = all(r is not None for rs in results.values() for r in rs)
            self._cleanup(keys, len(items), defer=done)
            if self.blob_folder is not None:  # a job still queued finds it gone: nothing to score
                self.blob_folder.delete(file)
            self.stats.seconds = time.monotonic() - start
            for name in ("submitted", "resubmitted", "duplicates_ignored", "redis_errors"):
                self.totals[name] = self.totals.get(name, 0) + getattr(self.stats, name)
        return results  # type: ignore[return-value]

    def take_counts(self) -> dict[str, int]:
        """Jobs submitted and resubmitted, duplicate results ignored and Redis errors retried since
        the last call (the loop logs them per epoch as `queue.*`)."""
        out, self.totals = {f"queue.{k}": v for k, v in self.totals.items()}, {}
        return out

    def _round(self, keys, blobs, todo: dict[str, list[int]], results, deadline: float) -> None:
        """Submit `todo` (respecting the in-flight cap) and gather until done or `deadline`."""
        queued = {s: list(v) for s, v in todo.items()}
        uploaded: set[int] = set()
        next_sweep = 0.0
        while time.monotonic() < deadline:
            if all(r is not None for rs in results.values() for r in rs):
                return
            try:
                self._bound(deadline)
                # One round trip: mark the batch live (set only if absent: a new batch, or Redis
                # lost our data) and read the lengths of the streams still to submit to.
                pending = [s for s, v in queued.items() if v]
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(keys.live, "1", ex=self.config.blob_ttl_s, nx=True)
                    for scorer in pending:
                        pipe.xlen(P.jobs_key(scorer))
                    delete(pipe, self._stale)  # the previous batches' leftovers, if any
                    created, *lengths = pipe.execute()[: 1 + len(pending)]
                self._stale = []
                if created and uploaded:  # Redis lost our data (restarted?): start over
                    log.warning("reward queue: batch %s lost (Redis restarted?); resubmitting", keys.batch)
                    self._gen += 1
                    queued = {s: [i for i, r in enumerate(results[s]) if r is None] for s in todo}
                    self.stats.resubmitted += sum(map(len, queued.values()))
                    uploaded.clear()
                self._submit(
                    keys, blobs, queued, uploaded, deadline, dict(zip(pending, lengths, strict=True))
                )
                wait = max(0.01, min(self.config.poll_s, deadline - time.monotonic()))
                missing = [(sc, i) for sc in todo for i, r in enumerate(results[sc]) if r is None]
                signalled, read = self._wait_signals(keys, wait, deadline, missing)
                sweep = time.monotonic() >= next_sweep
                if sweep:
                    next_sweep = time.monotonic() + self.config.poll_s
                self._bound(deadline)
                self._fetch(keys, results, signalled, sweep, todo, read)
                self._answered = True
            except _Late:
                return
            except _REDIS_DOWN as err:
                self._answered = False
                self.stats.redis_errors += 1
                log.warning("reward queue: Redis error (%s); retrying", err)
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _bound(self, deadline: float, extra_s: float = 0.0) -> None:
        """Give the next Redis call at most the time left before `deadline` (monotonic), capped by
        call_timeout_s; past the deadline, raise _Late without calling."""
        left = min(self.call_timeout_s, deadline - time.monotonic())
        if left <= 0:
            raise _Late()
        left += extra_s
        set_timeout(self.redis, left)

    def _submit(
        self, keys, blobs, queued: dict[str, list[int]], uploaded: set[int], deadline: float, lengths=None
    ) -> None:
        """Submit the queued jobs each stream has room for; `lengths`: the streams' lengths if just read."""
        for scorer, indices in queued.items():
            if not indices:
                continue
            if lengths is not None and scorer in lengths:
                length = lengths[scorer]
            else:
                self._bound(deadline)
                length = self.redis.xlen(P.jobs_key(scorer))
            peak = self.stats.max_stream_len
            peak[scorer] = max(peak.get(scorer, 0), length)
            room = self.config.max_in_flight - length
            if room <= 0:
                continue
            take = indices[:room]
            ttl = self.config.blob_ttl_s
            left_s = deadline - time.monotonic()
            deadline_ms, budget_ms = int((time.time() + left_s) * 1000), int(left_s * 1000)
            self._bound(deadline)
            # One MULTI/EXEC: a replica blocked on the stream wakes to every job of the batch at
            # once, not to the first XADDs of a plain pipeline (its batcher then fills its batches).
            # The jobs go as one script call per chunk of at most SUBMIT_CHUNK_BYTES of blobs (each
            # call one reply, not four per job; Redis holds one call's arguments at a time).
            head = [ttl, scorer, keys.run, keys.batch, deadline_ms, budget_ms, self._gen]
            with self.redis.pipeline(transaction=True) as pipe:
                for chunk in chunks(take, lambda i: 0 if i in uploaded else len(blobs[i])):
                    names, args = [P.jobs_key(scorer)], list(head)
                    for i in chunk:
                        up = i not in uploaded
                        names += [keys.blob(i), keys.need(i)]
                        args += [i, "1" if up else "0", blobs[i] if up else b""]
                    pipe.eval(P.SUBMIT_LUA, len(names), *names, *args)
                pipe.execute()
            # Only now are they sent: a pipeline cut off by a Redis error (restart, freeze) keeps
            # its jobs queued, and the next try sends them again (a job that did get through is
            # scored twice and its second result ignored).
            queued[scorer] = indices[room:]
            uploaded.update(take)
            self.stats.submitted += len(take)
            peak[scorer] = max(peak[scorer], length + len(take))

    def _wait_signals(self, keys, wait: float, deadline: float, missing: list[tuple[str, int]]):
        """Block up to `wait` s for the batch's signal list; return every (scorer, index) signalled
        and the results of `missing` read in the same round trip as the rest of the list (a result
        is written before its signal, so what is signalled is there): {(scorer, index): bytes}."""
        wait = max(0.01, min(wait, self.call_timeout_s - 0.25, deadline - time.monotonic()))
        self._bound(deadline, extra_s=0.25)  # the socket outlasts the block by a little
        first = self.redis.blpop([keys.signal], timeout=wait)
        if first is None:
            return [], {}
        self._bound(deadline)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(keys.signal, 0, -1)
            pipe.delete(keys.signal)
            if missing:
                pipe.mget([keys.result(s, i) for s, i in missing])
            rest, _, *values = pipe.execute()
        out = []
        for raw in [first[1], *rest]:
            scorer, _, index = raw.decode().partition(" ")
            out.append((scorer, int(index)))
        read = dict(zip(missing, values[0], strict=True)) if missing else {}
        return out, {k: v for k, v in read.items() if v is not None}

    def _fetch(self, keys, results, signalled, sweep: bool, todo, read=None) -> None:
        """Take the results signalled (and, on a sweep, every missing one): from `read` when the
        signals' round trip brought them, else with one MGET."""
        read = read or {}
        wanted: list[tuple[str, int]] = []
        for scorer, index in signalled:
            if scorer not in results or not 0 <= index < len(results[scorer]):
                continue
            if results[scorer][index] is not None:
                self.stats.duplicates_ignored += 1
            else:
                wanted.append((scorer, index))
        if sweep:
            wanted += [(s, i) for s in todo for i, r in enumerate(results[s]) if r is None]
        wanted = list(dict.fromkeys(wanted))
        for key in [k for k in wanted if k in read]:
            scorer, index = key
            if results[scorer][index] is None:
                results[scorer][index] = pb.Result.FromString(read[key])
        wanted = [k for k in wanted if k not in read]
        if not wanted:
            return
        values = self.redis.mget([keys.result(s, i) for s, i in wanted])
        for (scorer, index), value in zip(wanted, values, strict=True):
            if value is not None and results[scorer][index] is None:
                results[scorer][index] = pb.Result.FromString(value)

    def _cleanup(self, keys, n: int, defer: bool = False) -> None:
        """Delete the batch's blobs and bookkeeping (results stay until their TTL, so a late
        duplicate still finds its key taken): one pipeline, within GRACE_S; skipped when Redis did
        not answer the last call (the keys expire on their own). With `defer` (every result came
        back: the replicas already released the blobs, little is left) the names are deleted with
        the next batch's first round trip, or at `close()`, instead of costing one of their own."""
        if not self._answered:
            log.warning("reward queue: Redis not answering; batch %s keys expire on their own", keys.batch)
            return
        names = [keys.signal, keys.attempts, keys.live]
        names += [keys.blob(i) for i in range(n)] + [keys.need(i) for i in range(n)]
        self._stale += names
        if not defer:
            self._flush_stale(keys.batch)

    def _flush_stale(self, batch: str = "") -> None:
        if not self._stale:
            return
        try:
            set_timeout(self.redis, GRACE_S)
            with self.redis.pipeline(transaction=False) as pipe:
                delete(pipe, self._stale)
                pipe.execute()
        except _REDIS_DOWN as err:
            log.warning("reward queue: cleanup of batch %s failed (%s); keys expire on their own", batch, err)
        self._stale = []

    def _call(self, fn, within_s: float | None = None):
        """`fn()` (one Redis call), retried on connection errors for at most `within_s` seconds
        (default call_timeout_s), each try bounded by what is left."""
        deadline = time.monotonic() + (self.call_timeout_s if within_s is None else within_s)
        while True:
            try:
                self._bound(deadline)
                return fn()
            except _Late:
                raise redis.TimeoutError("reward queue: Redis did not answer in time") from None
            except _REDIS_DOWN:
                self.stats.redis_errors += 1
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # ---- results ---------------------------------------------------------------------------------

    def _higher_is_better(self, scorer: str) -> bool:
        if scorer not in self._higher:
            value = self._call(lambda: self.redis.hget(P.info_key(scorer), "higher_is_better"))
            if value is None:
                from reward_servers import base

                base.available_scorers()
                value = b"1" if getattr(base._REGISTRY.get(scorer), "higher_is_better", True) else b"0"
            self._higher[scorer] = value == b"1"
        return self._higher[scorer]

    def _to_scores(self, results: dict[str, list[pb.Result]]) -> Scores:
        return Scores.from_results(results, {s: self._higher_is_better(s) for s in results})

    def _diagnose(self, missing: dict[str, list[int]]) -> str:
        """'; scorer X: N jobs queued, K live replicas' for the scorers with missing items (within
        GRACE_S per scorer; skipped when Redis did not answer the last call)."""
        if not self._answered:
            return f"; Redis at {P.describe(self.url)} did not answer within {self.call_timeout_s:g}s"
        parts = []
        for scorer, indices in missing.items():
            if not indices:
                continue
            try:
                set_timeout(self.redis, GRACE_S)
                length = self.redis.xlen(P.jobs_key(scorer))
                live = len(
                    live_replicas(self.redis, scorer, prune=False)
                )  # from heartbeats, ~5 s old at most
                parts.append(f"{scorer}: {length} job(s) in its stream, {live} live replica(s)")
            except (redis.ResponseError, *_REDIS_DOWN) as err:
                parts.append(f"{scorer}: stream unavailable ({type(err).__name__})")
                if not isinstance(err, redis.ResponseError):
                    break  # Redis stopped answering: the next scorer would only wait as long
        return "; " + "; ".join(parts) if parts else ""
