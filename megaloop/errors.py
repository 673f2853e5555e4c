"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, impossible layout). Message names the fix."""
    exit_status = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read as asked (raised by the loop and the engines)."""
