"""The one exception type for user mistakes, shared with the reward servers (`reward_servers.errors`).

The `spie` command prints a `UserError` as one line, without a traceback, and exits with status 2.
Everything else is a bug and keeps its traceback.
"""

from reward_servers.errors import UserError

__all__ = ["UserError"]
