"""ONNX Runtime backend: any machine. `engine.py` runs a component; `fusions.py` rewrites the graph at load time for its CPU kernels."""
