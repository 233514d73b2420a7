"""Torch to ONNX export, parity check and the model artifact the worker loads."""


class ArtifactError(ValueError):
    """A model directory that cannot serve this configuration."""
