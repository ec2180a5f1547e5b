"""The one error type that the CLI and the console turn into a single line."""


class LabError(Exception):
    """A user-facing error: bad input, missing model or data, offline. Its message is one line."""
