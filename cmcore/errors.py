"""The errors a step reports as one line (``cm <step>: error: ...``, exit 2), kept free of torch
so that the command line and the steps that only read tables start without it."""


class DataError(Exception):
    """A data set is missing or malformed; the message says which file and how to fix it."""


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or foreign; the message names the file."""
