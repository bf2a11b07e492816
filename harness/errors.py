"""One exception type for bad user input: printed as one line, exit code 2, no traceback."""


class HarnessError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it (one line)."""


class IntegrityError(HarnessError):
    """A compressed weight failed its checksum: its bytes are corrupted."""
