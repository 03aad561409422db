"""What the trainer's `RewardClient` and the replicas' `StreamConsumer` agree on: key names, job
fields, connection settings and the Lua script that completes a job.

Per scorer S (shared by every run):

    spie:q:scorers            set    names of scorers that have (had) a replica
    spie:q:S:jobs             stream one entry per job: field "j" = "run batch index deadline_ms
                                     budget_ms gen" (`job_entry`; entries of older clients, with
                                     those six fields apart, are read too); group "replicas"
    spie:q:S:dead             stream jobs that failed `max_attempts` times, with their error
    spie:q:S:info             hash   version, higher_is_better, ... (written by every replica)
    spie:q:S:done             int    jobs completed, for throughput
    spie:q:S:replicas         hash   replica name -> JSON presence (seen_ms, ttl_ms, started_ms,
                                     completed, busy_s, draining), refreshed every heartbeat; removed
                                     on a clean exit, ignored (and pruned) once seen_ms + ttl_ms passed
    spie:q:S:scaling          stream an autoscaler's events (field "event": JSON), capped

Per rollout batch B of run R (all expire after the client's TTL). B is unique per client attempt
("<random attempt id>-b<counter>"), so a resumed run that reuses R never meets its predecessor's keys:

    spie:b:R:B:blob:I         string item I as a serialised `reward.proto` Item (shared by scorers)
    spie:b:R:B:need:I         set    scorers that still need blob I; the last one deletes the blob
    spie:b:R:B:res:S:I        string scorer S's `reward.proto` Result for item I, written only if absent
    spie:b:R:B:signal         list   "S I" pushed by whoever wrote a result: the gatherer's wake-up
    spie:b:R:B:attempts       hash   "S:I:G" -> times a replica started the job of generation G (the
                                     client's submission round; a resubmission starts a new count),
                                     "S:I:error" -> the last scorer error
    spie:b:R:B:live           string set by the client; gone after a Redis restart without persistence

A job's deadline travels as a duration, `budget_ms`, left when it was added: a replica adds it to
the entry id's time (Redis's clock) and compares with Redis's clock (TIME), so clock skew between the
trainer and the replicas does not matter. `deadline_ms` (the client's wall clock) is informational.

Acknowledged jobs are deleted from the stream, so a stream's length is the number of jobs waiting or
being scored: the in-flight count that backpressure caps. Payloads are protobuf bytes, never pickle.
"""

from __future__ import annotations

import os
from typing import Any

GROUP = "replicas"
SCORERS_KEY = "spie:q:scorers"
PASSWORD_ENV = "REDIS_PASSWORD"
URL_ENV = "REDIS_URL"


def jobs_key(scorer: str) -> str:
    return f"spie:q:{scorer}:jobs"


def dead_key(scorer: str) -> str:
    return f"spie:q:{scorer}:dead"


def info_key(scorer: str) -> str:
    return f"spie:q:{scorer}:info"


def done_key(scorer: str) -> str:
    return f"spie:q:{scorer}:done"


def replicas_key(scorer: str) -> str:
    return f"spie:q:{scorer}:replicas"


def scaling_key(scorer: str) -> str:
    return f"spie:q:{scorer}:scaling"


SCALING_MAXLEN = 200  # approximate cap on the events kept per scorer


class BatchKeys:
    """Key names of one rollout batch (`run`, `batch` are the client's ids)."""

    def __init__(self, run: str, batch: str) -> None:
        for name, value in (("run", run), ("batch", batch)):
            if not value or any(c in value for c in ": \t\n"):
                raise ValueError(f"queue {name} id {value!r} must be non-empty, without ':' or spaces")
        self.run, self.batch = run, batch
        self.prefix = f"spie:b:{run}:{batch}:"
        self.signal = self.prefix + "signal"
        self.attempts = self.prefix + "attempts"
        self.live = self.prefix + "live"

    def blob(self, index: int) -> str:
        return f"{self.prefix}blob:{index}"

    def need(self, index: int) -> str:
        return f"{self.prefix}need:{index}"

    def result(self, scorer: str, index: int) -> str:
        return f"{self.prefix}res:{scorer}:{index}"


def job_fields(
    run: str, batch: str, index: int, deadline_unix_ms: int, budget_ms: int | None = None, gen: int = 0
) -> dict[str, str]:
    """The fields of one stream entry (a job: score item `index` of the batch within `budget_ms` of
    the entry's creation; `gen` is the client's submission round, so a resubmission is told apart
    from a failed delivery)."""
    fields = {"run": run, "batch": batch, "index": str(index), "deadline_ms": str(deadline_unix_ms)}
    if budget_ms is not None:
        fields["budget_ms"] = str(max(0, int(budget_ms)))
    fields["gen"] = str(gen)
    return fields


def job_entry(
    run: str, batch: str, index: int, deadline_unix_ms: int, budget_ms: int | None = None, gen: int = 0
) -> dict[str, str]:
    """A job's stream entry: `job_fields` in one field "j" ("run batch index deadline_ms budget_ms
    gen", budget_ms empty when unknown), so a replica parses one field per job, not six. Replicas
    read both forms (entries of older clients have the six fields)."""
    budget = "" if budget_ms is None else str(max(0, int(budget_ms)))
    return {"j": f"{run} {batch} {index} {deadline_unix_ms} {budget} {gen}"}


def parse_job_entry(fields: dict[str, str]) -> dict[str, str]:
    """A job entry's fields in `job_fields`' form, whichever form it was written in."""
    if "j" not in fields:
        return fields
    run, batch, index, deadline_ms, budget_ms, gen = fields["j"].split(" ")
    out = {"run": run, "batch": batch, "index": index, "deadline_ms": deadline_ms, "gen": gen}
    if budget_ms:
        out["budget_ms"] = budget_ms
    return out


def entry_ms(entry_id: str) -> int:
    """The Redis server time (unix ms) at which a stream entry with an auto id was added."""
    return int(entry_id.split("-", 1)[0])


def attempts_field(scorer: str, index: int, gen: int) -> str:
    return f"{scorer}:{index}:{gen}"


def error_field(scorer: str, index: int) -> str:
    return f"{scorer}:{index}:error"


# Complete one job atomically: write the result if absent; if written, release the blob (deleted by
# the last scorer that needed it), signal the gatherer and count it; always ack and delete the entry.
# KEYS: result, need set, blob, signal list, stream, attempts hash, done counter
# ARGV: result bytes, ttl s, scorer, signal member, group, entry id, attempts field
COMPLETE_LUA = """
local wrote = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if wrote then
  redis.call('SREM', KEYS[2], ARGV[3])
  if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
  redis.call('RPUSH', KEYS[4], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  redis.call('INCR', KEYS[7])
end
redis.call('XACK', KEYS[5], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[5], ARGV[6])
redis.call('HDEL', KEYS[6], ARGV[7])
if wrote then return 1 else return 0 end
"""


# The same for many jobs in one call, one reply instead of one per job, with each job's keys built
# in the script from its batch's prefix (`BatchKeys.prefix`) and index, so a job costs five
# arguments, not fourteen, and the acknowledgements, deletions and the done count go as one command
# each. KEYS: the stream, the done counter. ARGV: ttl s, scorer, group, then per job its batch
# prefix, item index, entry id, generation and result bytes. Returns each job's 1 (written) or 0
# (another replica wrote it first). Same effects, per job, as COMPLETE_LUA.
COMPLETE_MANY_LUA = """
local ttl, scorer, group = ARGV[1], ARGV[2], ARGV[3]
local out, ids, fields, written = {}, {}, {}, 0
for j = 0, (#ARGV - 3) / 5 - 1 do
  local a = 3 + 5 * j
  local prefix, index = ARGV[a+1], ARGV[a+2]
  local wrote = redis.call('SET', prefix .. 'res:' .. scorer .. ':' .. index, ARGV[a+5], 'NX', 'EX', ttl)
  if wrote then
    local need = prefix .. 'need:' .. index
    redis.call('SREM', need, scorer)
    if redis.call('SCARD', need) == 0 then redis.call('DEL', prefix .. 'blob:' .. index) end
    redis.call('RPUSH', prefix .. 'signal', scorer .. ' ' .. index)
    redis.call('EXPIRE', prefix .. 'signal', ttl)
    written = written + 1
  end
  redis.call('HDEL', prefix .. 'attempts', scorer .. ':' .. index .. ':' .. ARGV[a+4])
  ids[#ids+1] = ARGV[a+3]
  out[j+1] = wrote and 1 or 0
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
if written > 0 then redis.call('INCRBY', KEYS[2], written) end
return out
"""

# A replica starts the jobs of one read: count an attempt of each (HINCRBY, with the hash's TTL),
# and fetch its last error and its blob. KEYS: per job, its batch's attempts hash and its blob;
# ARGV: the TTL in seconds, then per job its attempts field and its error field. Returns, per job,
# {attempt, last error or false, blob or false}, flattened.
START_LUA = """
local out = {}
for j = 0, #KEYS / 2 - 1 do
  local n = redis.call('HINCRBY', KEYS[2*j+1], ARGV[2*j+2], 1)
  redis.call('EXPIRE', KEYS[2*j+1], ARGV[1])
  out[3*j+1] = n
  out[3*j+2] = redis.call('HGET', KEYS[2*j+1], ARGV[2*j+3])
  out[3*j+3] = redis.call('GET', KEYS[2*j+2])
end
return out
"""

# The trainer's client submits jobs to one scorer's stream with this script (its calls for one batch
# in one MULTI/EXEC, so a replica blocked on the stream wakes to all of them at once): per item, the
# blob (when not uploaded yet), the scorer added to the item's "need" set (with the TTL), and the
# job's entry. KEYS: the stream, then per item its blob and
# need keys. ARGV: TTL s, scorer, run, batch, deadline_ms, budget_ms, gen, then per item its index,
# "1" if its blob is to be stored (else "0") and the blob (else ""). Returns the number of jobs.
# The entries are `job_entry`'s.
SUBMIT_LUA = """
local n = (#KEYS - 1) / 2
for j = 0, n - 1 do
  if ARGV[8 + 3*j + 1] == '1' then redis.call('SET', KEYS[2 + 2*j], ARGV[8 + 3*j + 2], 'EX', ARGV[1]) end
  redis.call('SADD', KEYS[3 + 2*j], ARGV[2])
  redis.call('EXPIRE', KEYS[3 + 2*j], ARGV[1])
  redis.call('XADD', KEYS[1], '*', 'j', ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[8 + 3*j] .. ' ' ..
    ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. ARGV[7])
end
return n
"""


def redis_url(url: str | None = None) -> str | None:
    """`url`, else the REDIS_URL environment variable, else None (meaning: start an embedded one)."""
    return url or os.environ.get(URL_ENV) or None


def connect(url: str, password: str | None = None, asyncio: bool = False, **kwargs: Any):
    """A redis-py client for `url` (redis://, rediss:// or unix://).

    The password comes from the URL, else `password`, else the REDIS_PASSWORD environment variable.
    Socket timeouts are set so that no call can hang forever (10 s unless given; callers with a
    deadline pass a shorter one); blocking commands use shorter blocks.
    """
    import redis
    import redis.asyncio
    from redis.connection import parse_url

    if not parse_url(url).get("password"):
        password = password or os.environ.get(PASSWORD_ENV) or None
        if password:
            kwargs["password"] = password
    kwargs.setdefault("socket_timeout", 10.0)
    kwargs.setdefault("socket_connect_timeout", min(5.0, kwargs["socket_timeout"] or 5.0))
    module = redis.asyncio if asyncio else redis
    return module.Redis.from_url(url, **kwargs)


def describe(url: str) -> str:
    """`url` without its password, for messages."""
    from redis.connection import parse_url

    parsed = parse_url(url)
    if "path" in parsed:
        return f"unix://{parsed['path']}"
    return f"{parsed.get('host', '?')}:{parsed.get('port', 6379)}"
