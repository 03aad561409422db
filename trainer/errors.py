"""The one exception type for user mistakes (bad config, missing file, unreadable image).

The `spie` command prints a `UserError` as one line, without a traceback, and exits with status 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message names the file or field and says what is wrong."""
