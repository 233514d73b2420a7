"""Torch to ONNX export, parity check and the model artifact the worker loads."""
