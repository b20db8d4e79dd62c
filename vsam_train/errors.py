"""Exceptions that torch-free modules raise too (inference.py's ONNX path never imports torch)."""


class CheckpointError(RuntimeError):
    """A checkpoint (or exported model) that cannot be read or used; the message names the file."""
