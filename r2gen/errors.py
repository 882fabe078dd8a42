"""Errors a user can fix: bad input or hardware that cannot serve the request (exit code 2)."""


class UsageError(Exception):
    """Bad input or an unusable request; the message is one line naming the file, field or flag."""

    exit_code = 2


class DataError(UsageError):
    """A malformed or missing annotation file, split, field or image."""


class ConfigError(UsageError):
    """Contradictory or invalid options."""


class BackendError(UsageError):
    """The hardware or installed software cannot serve the requested backend or precision."""


class RunFailed(Exception):
    """The run started but could not finish (exit code 1); the message says what was saved."""

    exit_code = 1
