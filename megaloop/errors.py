"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, impossible layout). Message names the fix."""
    exit_status = 2
