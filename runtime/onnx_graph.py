"""Small helpers shared by the ONNX rewrites of export/ and runtime/."""

from __future__ import annotations


def used_names(graph) -> set[str]:
    """Tensor names read by the graph's nodes (subgraphs included) or returned by it."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for a in node.attribute:
            for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                used |= used_names(sub)
    return used


def drop_dead(graph) -> None:
    """Remove the nodes whose outputs nothing reads, then the initializers nothing reads."""
    while True:
        used = used_names(graph)
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    # Deleted in place: extending a repeated field copies each tensor, weights included.
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
