"""Classifier-free guidance and the flow-matching Euler step as a small ONNX graph.

The TensorRT backend builds it into an engine next to the denoiser, so a denoising step runs on
the device from the denoiser's output to the next denoiser input:

    velocity      = uncond + guidance * (cond - uncond)      (with guidance; else the output itself)
    latents_next  = latents + dt * velocity                  (dt = sigma[i + 1] - sigma[i])
    model_input   = [latents_next, latents_next]             (the next call's batch; once without guidance)

`coefficients` = [guidance, dt] is the only per-step input from the host (8 bytes). The graph is the
same arithmetic, in the same order, as `Pipeline._generate` with `FlowMatchSchedule.step`, so
ONNX Runtime checks it here against the numpy loop; TensorRT-RTX's builder compiles it in CI.
"""

from __future__ import annotations

from latentrt.bundle.manifest import TensorSpec

OPSET = 18


def step_specs(rank: int, *, cfg: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The step graph's inputs and outputs, as the TensorRT engine checks them."""
    dims = tuple(f"d{i}" for i in range(1, rank))
    call = "call_batch" if cfg else "batch"
    inputs = (
        TensorSpec("sample", "float32", (call, *dims)),
        TensorSpec("latents", "float32", ("batch", *dims)),
        TensorSpec("coefficients", "float32", (2,)),
    )
    outputs = (TensorSpec("latents_next", "float32", ("batch", *dims)), TensorSpec("model_input", "float32", (call, *dims)))
    return inputs, outputs


def flow_step_model(rank: int, *, cfg: bool):
    """The step graph for latents of `rank` dims ([batch, ...]; 4 for NCHW, 3 for packed tokens).

    Inputs: `sample` [2b or b, ...] (the denoiser's output, negatives first), `latents` [b, ...],
    `coefficients` [2] float32. Outputs: `latents_next` [b, ...], `model_input` [2b or b, ...].
    """
    import onnx
    from onnx import TensorProto, helper

    if rank < 2:
        raise ValueError(f"latents need a batch axis and at least one more; got rank {rank}")
    nodes = [
        helper.make_node("Split", ["coefficients"], ["guidance", "dt"], axis=0, num_outputs=2),
    ]
    if cfg:
        nodes += [
            helper.make_node("Split", ["sample"], ["uncond", "cond"], axis=0, num_outputs=2),
            helper.make_node("Sub", ["cond", "uncond"], ["delta"]),
            helper.make_node("Mul", ["guidance", "delta"], ["guided"]),
            helper.make_node("Add", ["uncond", "guided"], ["velocity"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["sample"], ["velocity"]))
    nodes += [
        helper.make_node("Mul", ["dt", "velocity"], ["update"]),
        helper.make_node("Add", ["latents", "update"], ["latents_next"]),
        helper.make_node("Concat", ["latents_next", "latents_next"], ["model_input"], axis=0)
        if cfg
        else helper.make_node("Identity", ["latents_next"], ["model_input"]),
    ]
    inputs, outputs = step_specs(rank, cfg=cfg)

    def value_info(spec: TensorSpec):
        return helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, list(spec.shape))

    graph = helper.make_graph(nodes, "flow_match_step", [value_info(s) for s in inputs], [value_info(s) for s in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="latentrt")
    onnx.checker.check_model(model, full_check=True)
    return model
