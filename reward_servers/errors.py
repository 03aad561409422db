"""The one exception type for user mistakes (bad config, missing file, unreadable image).

A command prints a `UserError` as one line, without a traceback, and exits with status 2; everything
else is a bug and keeps its traceback. The trainer re-exports this class (`trainer.errors`), so one
`except UserError` catches mistakes found on either side.
"""


class UserError(Exception):
    """A mistake in the user's input: the message names the file or field and says what is wrong."""
