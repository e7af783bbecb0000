"""lmu-asr: a throughput-first speech-recognition training system (LMU-attention CTC on WebDataset shards)."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input (paths, flags, data): the CLI prints its one-line message, no traceback."""
