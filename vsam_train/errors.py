"""Exceptions that torch-free modules raise too (inference.py's ONNX path never imports torch)."""


class CheckpointError(RuntimeError):
    """A checkpoint (or exported model) that cannot be read or used; the message names the file."""


class MissingExtra(RuntimeError):
    """An optional package that a command needs is not installed; the message names the pip extra."""
