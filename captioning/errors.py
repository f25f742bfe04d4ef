"""The one exception that reaches the user as a message rather than a traceback."""


class PipelineError(Exception):
    """A failure the user can fix: printed as one message, without a traceback."""
