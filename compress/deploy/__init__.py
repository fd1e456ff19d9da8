"""Deployment: ONNX export with verification, onnxruntime prediction, and the latency benchmark."""
