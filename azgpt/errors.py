"""The one exception type users see: bad input or usage, reported as one sentence, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or usage. The message is one sentence naming the file or option and the fix."""

    exit_code = 2
