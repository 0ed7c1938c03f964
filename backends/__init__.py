"""Lowering and runtimes (imported as ``fxq.backends``): ONNX QDQ export, onnxruntime sessions, latency."""
