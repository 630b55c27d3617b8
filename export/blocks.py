"""Repeated blocks traced once: the glue with each block as a placeholder, one template per block kind.

A 12B-parameter transformer is a little glue (embeddings, the output head) around dozens of blocks
with one structure. Exporting it without holding its weights:

1. `trace_glue` exports the module with each call of a block of the listed ModuleLists replaced by a
   `latentrt::Block` placeholder node (a custom autograd Function with an ONNX symbolic), at two sets
   of sizes: each call's tensor inputs, non-tensor arguments and output shapes are recorded, and the
   dims that differ between the sizes are the dynamic ones.
2. `trace_template` exports one block of each kind (same class, parameters, arguments) as its own
   graph.
3. `stitch` replaces every placeholder by a copy of its template, named as a whole-model trace names
   it (`/model/transformer_blocks.7/attn/...`), whose weights are that block's tensors in the
   checkpoint (`transformer_blocks.7.attn.to_q.weight`).

Every trace runs on zero weights (export/tracing.py): the weights are graph inputs named after the
parameters, and become initializers read from the checkpoint only when a consumer (the writer, a
validation run) needs them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from latentrt.errors import ExportError
from latentrt.export.tracing import trace_to_onnx
from latentrt.export.graph_passes import fold_weight_views
from latentrt.export.weights import Recipe, inputs_to_weights

logger = logging.getLogger(__name__)

DOMAIN = "latentrt"


@dataclass
class BlockCall:
    """One call of a block during the component's forward.

    Attributes:
        index: the call's position (0, 1, ...).
        path: the block's module path inside the component module ("model.transformer_blocks.7").
        block: the block module.
        spec: the pytree spec of the call's `(args, kwargs)`; `constants` holds its non-tensor
            leaves (SLOT where a tensor goes).
        out_spec, out_constants: the same for the call's return value.
        inputs: the call's tensor inputs at the trace sizes (values from the real glue, with
            zeros for the outputs of earlier blocks).
        shapes: each observation's input and output shapes (one entry per observed size set).
        outputs: (shape, dtype) of each tensor output at the trace sizes.
    """

    index: int
    path: str
    block: torch.nn.Module
    spec: Any
    constants: list
    out_spec: Any = None
    out_constants: list = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[list[tuple[int, ...]], list[tuple[int, ...]]]] = field(default_factory=list)
    outputs: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)

    @property
    def kind(self) -> tuple:
        """Calls of one kind share a template: same class, parameter shapes and non-tensor arguments."""
        params = tuple((n, tuple(p.shape)) for n, p in self.block.named_parameters())
        return (type(self.block).__qualname__, params, str(self.spec), repr(self.constants), str(self.out_spec))

    def dynamic_dims(self) -> tuple[list[set[int]], list[set[int]]]:
        """Per input and per output, the dims whose size differs between the observations."""
        (ins0, outs0), *rest = self.shapes
        din = [{d for d in range(len(s)) if any(r[0][i][d] != s[d] for r in rest)} for i, s in enumerate(ins0)]
        dout = [{d for d in range(len(s)) if any(r[1][i][d] != s[d] for r in rest)} for i, s in enumerate(outs0)]
        return din, dout


def find_blocks(module: torch.nn.Module, lists: Sequence[str]) -> dict[str, torch.nn.Module]:
    """path -> block for every element of the ModuleLists named by `lists` inside `module`.

    A name matches the ModuleList whose path ends with it ("encoder.layers" finds
    "text_model.encoder.layers" too: libraries move their wrappers between versions).

    Raises:
        ExportError: a name matches no ModuleList, or several.
    """
    modules = dict(module.named_modules())
    blocks = {}
    for name in lists:
        found = [p for p, m in modules.items() if isinstance(m, torch.nn.ModuleList) and (p == name or p.endswith("." + name))]
        if len(found) != 1:
            raise ExportError(
                f"{type(module).__name__} has {len(found) or 'no'} ModuleList{'s' if len(found) != 1 else ''} named like {name!r}"
                + (f" ({', '.join(found)})" if found else "") + "; the family's block list does not fit this model"
            )
        for i, block in enumerate(modules[found[0]]):
            blocks[f"{found[0]}.{i}"] = block
    return blocks


class _Slot:
    """Where a tensor goes among a call's non-tensor leaves."""

    def __repr__(self) -> str:
        return "<tensor>"


SLOT = _Slot()


def _split(tree) -> tuple[list[torch.Tensor], list, Any]:
    """A pytree's tensors, its other leaves (SLOT where a tensor was) and its spec."""
    leaves, spec = pytree.tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    constants = [SLOT if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tensors, constants, spec


def _join(tensors: Sequence[torch.Tensor], constants: list, spec):
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if c is SLOT else c for c in constants], spec)


@contextlib.contextmanager
def _patched(blocks: Mapping[str, torch.nn.Module], make_forward) -> Iterator[None]:
    """Replace each block's forward by `make_forward(path, block)` (an instance attribute), restored on exit."""
    for path, block in blocks.items():
        block.forward = make_forward(path, block)
    try:
        yield
    finally:
        for block in blocks.values():
            del block.forward


def trace_glue(module: torch.nn.Module, blocks: Mapping[str, torch.nn.Module], examples: Sequence[Sequence[torch.Tensor]], export):
    """Export `module` with every block call as a `latentrt::Block` placeholder node; returns the
    glue graph of the last example and the block calls.

    `export(example)` runs the exporter on `module` (the placeholders are in place while it runs).
    Each example is traced; the last one's graph is kept and the earlier ones tell the dynamic dims
    apart (so give the trace sizes last). Inside the trace, a placeholder runs a meta-device copy of
    its block kind for the shapes and dtypes of its outputs and returns zeros of those (the blocks'
    weights are never read: they may be on the meta device), so the glue after it sees tensors of the
    right shapes and dtypes, and each call's
    inputs are recorded as the exporter traces them (a library may build masks differently when
    tracing).
    """
    calls: list[BlockCall] = []
    stand_ins: dict[tuple, torch.nn.Module] = {}
    state = {"run": 0, "next": 0}

    class Placeholder(torch.autograd.Function):
        @staticmethod
        def forward(ctx, index: int, *tensors):  # noqa: ARG004
            call = calls[index]
            tracing = torch._C._get_tracing_state()  # noqa: SLF001 - the stand-in's work stays out of the trace
            torch._C._set_tracing_state(None)  # noqa: SLF001
            try:
                kind = call.kind[:4]
                if kind not in stand_ins:
                    stand_ins[kind] = stand_in(call.block)
                args, kwargs = _join([t.detach().to("meta") for t in tensors], call.constants, call.spec)
                out_tensors, call.out_constants, call.out_spec = _split(stand_ins[kind](*args, **kwargs))
                call.inputs = [t.detach().clone() for t in tensors]
                outputs = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in out_tensors)
            finally:
                torch._C._set_tracing_state(tracing)  # noqa: SLF001
            call.shapes.append(([tuple(t.shape) for t in call.inputs], [tuple(t.shape) for t in outputs]))
            call.outputs = [(tuple(t.shape), t.dtype) for t in outputs]
            return outputs

        @staticmethod
        def symbolic(g, index: int, *tensors):
            call = calls[index]
            out = g.op(f"{DOMAIN}::Block", *tensors, call_i=index, outputs=len(call.outputs))
            outs = out if len(call.outputs) > 1 else (out,)
            dynamic = call.dynamic_dims()[1] if len(call.shapes) > 1 else [set()] * len(call.outputs)
            for value, (shape, dtype), dims in zip(outs, call.outputs, dynamic):
                # Dynamic dims left unknown: a static size would be folded into the glue after the block.
                known = torch._C.TensorType.create_from_tensor(torch.zeros(shape, dtype=dtype))  # noqa: SLF001
                value.setType(known.with_sizes([None if d in dims else n for d, n in enumerate(shape)]))
            return out

    def make_forward(path: str, block: torch.nn.Module):
        def forward(*args, **kwargs):
            tensors, constants, spec = _split((args, kwargs))
            if state["run"] == 0:
                calls.append(BlockCall(len(calls), path, block, spec, constants))
            index = state["next"]
            state["next"] += 1
            if index >= len(calls) or calls[index].path != path or repr(calls[index].constants) != repr(constants):
                raise ExportError(f"the blocks were called differently at other sizes (at {path}); this model cannot be exported block by block")
            out = Placeholder.apply(index, *tensors)
            return _join(out if isinstance(out, tuple) else (out,), calls[index].out_constants, calls[index].out_spec)

        return forward

    model = None
    with _patched(blocks, make_forward):
        for run, example in enumerate(examples):
            state["run"], state["next"] = run, 0
            model = export(example)
            if state["next"] != len(calls):
                raise ExportError(f"the model called {state['next']} blocks at other sizes, {len(calls)} at the first ones")
    return model, calls


class FlatBlock(torch.nn.Module):
    """One block as a module of tensors only: `forward(*inputs) -> tuple(outputs)` (the call's pytree
    rebuilt around them), so it can be exported on its own."""

    def __init__(self, block: torch.nn.Module, call: BlockCall) -> None:
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, *tensors):
        args, kwargs = _join(tensors, self.call.constants, self.call.spec)
        out, _, _ = _split(self.block(*args, **kwargs))
        return tuple(out)


def stand_in(block: torch.nn.Module) -> torch.nn.Module:
    """A copy of `block` on the meta device, to run for its output shapes and dtypes (nothing is
    computed, nothing allocated), without the original's hooks or patched forward."""
    # Given through deepcopy's memo, the parameters are never copied: cloning a weight (even a
    # broadcast placeholder) would allocate all of it.
    memo = {id(p): torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False) for p in block.parameters()}
    clone = copy.deepcopy(block, memo).to("meta")
    clone.__dict__.pop("forward", None)  # a forward patched onto the instance stays with the original
    for module in clone.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,  # noqa: SLF001
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):  # noqa: SLF001
            hooks.clear()  # transformers records hidden states with hooks: they stay with the original
    return clone.eval()


@dataclass
class Template:
    """A block kind's graph: inputs `in{i}`, outputs `out{j}`; its weights are initializers without
    data named by the block's parameter names ("attn.to_q.weight"), with their `recipes`."""

    model: Any  # onnx.ModelProto
    recipes: dict[str, Recipe]


def trace_template(call: BlockCall, *, opset: int, exporter: str) -> Template:
    """Export `call`'s block kind as its own graph (on zero weights: nothing of the block is read)."""
    din, dout = call.dynamic_dims()
    names = dict(
        input_names=[f"in{i}" for i in range(len(call.inputs))],
        output_names=[f"out{j}" for j in range(len(call.outputs))],
        opset=opset,
        exporter=exporter,
        what=f"block {call.path}",
    )
    # In eval mode: torch.onnx.export restores the wrapper's mode recursively, which would switch the
    # block's dropout on (a fresh module is in training mode).
    module = FlatBlock(call.block, call).eval()
    if exporter == "dynamo":
        shapes = (tuple({d: torch.export.Dim.AUTO for d in dims} for dims in din),)  # forward(*tensors): one varargs entry
        model = trace_to_onnx(module, tuple(call.inputs), dynamic_shapes=shapes, **names)
    else:
        axes = {f"in{i}": {d: f"in{i}_{d}" for d in dims} for i, dims in enumerate(din)}
        axes |= {f"out{j}": {d: f"out{j}_{d}" for d in dims} for j, dims in enumerate(dout)}
        model = trace_to_onnx(module, tuple(call.inputs), dynamic_axes=axes, **names)
    recipes = inputs_to_weights(model, {f"block.{n}": n for n, _ in call.block.state_dict(keep_vars=True).items()})
    fold_weight_views(model, recipes)
    return Template(model, recipes)


def stitch(glue, calls: Sequence[BlockCall], templates: Mapping[tuple, Template], param_name) -> dict[str, Recipe]:
    """Replace every `latentrt::Block` node of `glue` (in place) by its template, renamed for its
    block; returns the recipes of the new initializers. `param_name(path, name)` is the checkpoint
    name of parameter `name` of the block at `path` (name "" gives the block's prefix)."""
    graph = glue.graph
    nodes = []
    recipes: dict[str, Recipe] = {}
    seen_inits = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        call = calls[next(a.i for a in node.attribute if a.name == "call")]
        template = templates[call.kind]
        prefix = "/" + call.path
        scope = "/block"  # FlatBlock's attribute: the template's node names start with it

        def rename(name: str) -> str:
            if not name:
                return name
            if name.startswith(scope + "/"):
                return prefix + name[len(scope):]
            return f"{prefix}/{name.lstrip('/')}"

        mapping = {f"in{i}": name for i, name in enumerate(node.input)} | {f"out{j}": name for j, name in enumerate(node.output)}
        tgraph = template.model.graph
        block_prefix = param_name(call.path, "")
        weights = {t.name: block_prefix + t.name for t in tgraph.initializer if t.name in template.recipes}
        for tensor in tgraph.initializer:
            new = type(tensor)()
            new.CopyFrom(tensor)
            new.name = weights.get(tensor.name) or rename(tensor.name)
            if new.name not in seen_inits:
                graph.initializer.append(new)
                seen_inits.add(new.name)
            if tensor.name in template.recipes:
                recipes[new.name] = template.recipes[tensor.name].renamed(lambda p: block_prefix + p)
        mapping |= weights
        for tnode in tgraph.node:
            new = type(tnode)()
            new.CopyFrom(tnode)
            new.name = rename(tnode.name) if tnode.name else ""
            new.input[:] = [mapping.get(t, rename(t)) for t in tnode.input]
            new.output[:] = [mapping.get(t, rename(t)) for t in tnode.output]
            _rename_subgraphs(new, mapping, rename)
            nodes.append(new)
        for opset in template.model.opset_import:
            if opset.domain and not any(o.domain == opset.domain for o in glue.opset_import):
                glue.opset_import.append(opset)
        for function in template.model.functions:
            if not any(f.name == function.name and f.domain == function.domain for f in glue.functions):
                glue.functions.append(function)
    del graph.node[:]
    graph.node.extend(nodes)
    for i in reversed(range(len(glue.opset_import))):
        if glue.opset_import[i].domain == DOMAIN:
            del glue.opset_import[i]
    del graph.value_info[:]
    return recipes


def _rename_subgraphs(node, mapping: Mapping[str, str], rename) -> None:
    """Outer names read inside If/Loop bodies follow the renaming (the bodies' own names too)."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                inner.input[:] = [mapping.get(t, rename(t)) for t in inner.input]
                inner.output[:] = [mapping.get(t, rename(t)) for t in inner.output]
                _rename_subgraphs(inner, mapping, rename)
            for value in list(sub.input) + list(sub.output):
                value.name = mapping.get(value.name, rename(value.name))
