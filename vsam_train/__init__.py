"""vsam_train: VSAM and its baselines, trained on pose_prep's shards, and what uses a trained model.

The front door for code that uses a model (the README's Python usage): `load_for_inference` (a checkpoint →
model and `ModelInfo`, whose `preprocess` is the model's pixel path), `load_model` (the same for an ONNX
export), `create_model` and `preprocess`. Each is imported on first use, not with the package: the ONNX path
of `vsam predict` imports `vsam_train.inference` and must not pull in torch (docs/inference.md).
"""
from importlib import import_module

_EXPORTS = {"load_for_inference": ".checkpoint", "ModelInfo": ".inference", "load_model": ".inference",
            "create_model": ".models", "preprocess": ".data"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
