"""Reading a graph before rewriting it (`GraphView`) and removing what nothing reads (`drop_dead`)."""

from __future__ import annotations


class GraphView:
    """Producers, consumers and constants of one graph, for pattern matching before a rewrite.

    A node whose subgraph (an If branch, a Loop body) reads a tensor counts as one of its consumers.
    Constants are the initializers (except those also declared as graph inputs, which a caller may
    override) and Constant nodes, kept as TensorProtos and converted on lookup, so a model's weights
    are not copied into numpy arrays up front. onnx-graphsurgeon's `Graph` offers the same links, but
    only after importing the model (and exporting it again after a rewrite); this reads and edits the
    protobuf in place, and keeps onnx-graphsurgeon out of the runtime's dependencies.
    """

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in list(n.input) + sorted(subgraph_reads(n) - set(n.input)):
                self.consumers.setdefault(i, []).append(n)
        inputs = {i.name for i in graph.input}
        self.constants = {t.name: t for t in graph.initializer if t.name not in inputs}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self._to_array = numpy_helper.to_array

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str):
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def constant(self, name: str):
        t = self.constants.get(name)
        return None if t is None else self._to_array(t)


def used_names(graph) -> set[str]:
    """Tensor names read by the graph's nodes (subgraphs included) or returned by it."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        used |= subgraph_reads(node)
    return used


def subgraph_reads(node) -> set[str]:
    """Names read inside the node's subgraphs (a superset of the outer tensors they use)."""
    reads: set[str] = set()
    for a in node.attribute:
        for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
            reads |= used_names(sub)
    return reads


def drop_dead(graph) -> None:
    """Remove the nodes whose outputs nothing reads, then the initializers nothing reads.

    onnx-graphsurgeon's `Graph.cleanup()` prunes the same nodes, but through an import / export round
    trip that rebuilds every initializer; the runtime's load-time rewrites call this on each session
    load, in place, without copying weights or depending on onnx-graphsurgeon.
    """
    while True:
        used = used_names(graph)
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    # Deleted in place: extending a repeated field copies each tensor, weights included. An
    # initializer also declared as a graph input goes with its declaration, or it becomes a required input.
    dropped = set()
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            dropped.add(graph.initializer[i].name)
            del graph.initializer[i]
    for i in reversed(range(len(graph.input))):
        if graph.input[i].name in dropped:
            del graph.input[i]


def weightless(model, keep=lambda tensor: False):
    """A copy of `model` without its weights: each initializer not `keep`-ed becomes a graph input
    of its dtype and shape. Shape inference and the checker then work on models of any size, with
    external data or without data at all, and never read a weight."""
    from onnx import helper

    graph = model.graph
    kept = [t for t in graph.initializer if keep(t)]
    declared = {t.name for t in kept} | {i.name for i in graph.input}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name not in declared]
    copy = helper.make_model(
        helper.make_graph(list(graph.node), graph.name, list(graph.input) + weights, list(graph.output), kept),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    copy.functions.extend(model.functions)
    return copy
