"""ONNX graph utilities shared by export's passes, calibration and the runtime's load-time rewrites."""

from latentrt.graph.view import GraphView, drop_dead, subgraph_reads, used_names, weightless

__all__ = ["GraphView", "drop_dead", "subgraph_reads", "used_names", "weightless"]
