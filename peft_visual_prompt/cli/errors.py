"""The CLI's error type and exit statuses, which every command module and the argument dataclasses share."""

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""
