"""Refittable engines: which weights a refit may set (from TensorRT-RTX's real parser), and everything
the runtime does before handing them to TensorRT (names, order, shapes, dtypes, values)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from latentrt.engines.build import refittable_weights
from latentrt.errors import BuildError, InputError
from latentrt.runtime.backends.tensorrt.refit import onnx_initializers, prepare_refit, read_initializers


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'latentrt[tensorrt-rtx]'")
    from latentrt.engines.library import load_library

    return load_library("tensorrt-rtx")


@pytest.fixture(scope="module")
def transformer(rtx, tiny_sd3_bundle):
    """The tiny-sd3 transformer's ONNX and what TensorRT-RTX's parser holds of it as named weights."""
    from latentrt.engines.library import make_logger

    path = tiny_sd3_bundle / "onnx" / "transformer.onnx"
    logger = make_logger(rtx)
    builder = rtx.module.Builder(logger)
    network = builder.create_network(rtx.network_flags)
    parser = rtx.module.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    weights = refittable_weights(network, path, logger)
    return path, weights, network


def test_refittable_weights_are_the_initializers_the_network_holds(transformer):
    path, weights, network = transformer
    initializers = onnx_initializers(path)
    names = [w["name"] for w in weights]
    order = [i.name for i in initializers]
    assert names == [n for n in order if n in set(names)]  # the ONNX file's order
    model = onnx.load(path, load_external_data=False)
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in set(order)}
    assert matmul_weights and matmul_weights <= set(names)  # every linear / conv weight can be refitted
    assert not [n for n in names if n.endswith("split_sizes")]  # shape constants of the fused Q/K/V Split are not weights
    by_name = {i.name: i for i in initializers}
    assert all(w["dtype"] == by_name[w["name"]].dtype and tuple(w["shape"]) == by_name[w["name"]].shape for w in weights)
    assert all(not network.are_weights_marked_refittable(n) for n in names)  # the query left no marks behind


def test_prepare_refit_orders_converts_and_checks(transformer):
    path, weights, _ = transformer
    names = [w["name"] for w in weights]
    first, last = names[0], names[-1]
    values = read_initializers(path, [first, last])
    new = {last: values[last].astype(np.float64) * 2, first: values[first] + 1}  # given out of order, one in float64
    plan = prepare_refit(path, new, refittable=weights)
    assert [name for name, _ in plan] == [first, last]
    for name, array in plan:
        assert array.dtype == np.float32 and array.flags.c_contiguous
    np.testing.assert_array_equal(plan[1][1], (values[last].astype(np.float64) * 2).astype(np.float32))


def test_prepare_refit_rejects_with_every_problem(transformer):
    path, weights, _ = transformer
    name = weights[0]["name"]
    shape = tuple(weights[0]["shape"])
    split = next(i.name for i in onnx_initializers(path) if i.name.endswith("split_sizes"))
    bad = {
        name: np.zeros((1, *shape), np.float32),
        "model.no_such.weight": np.zeros(3, np.float32),
        weights[1]["name"]: np.full(weights[1]["shape"], np.nan, np.float32),
        split: np.array([1, 2, 3], np.int64),
    }
    with pytest.raises(InputError) as err:
        prepare_refit(path, bad, refittable=weights)
    message = str(err.value)
    assert f"{name!r} has shape {(1, *shape)}, the engine's weight has {shape}" in message
    assert "'model.no_such.weight' is not an initializer of transformer.onnx" in message
    assert "has NaN or infinite values" in message
    assert f"{split!r} is not among the engine's refittable weights" in message


def test_prepare_refit_converts_to_half_precision(tmp_path):
    w16 = numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "w16")
    ids = numpy_helper.from_array(np.array([0, 1], np.int64), "ids")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w16"], ["y"]), helper.make_node("Gather", ["y", "ids"], ["z"], axis=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 2])],
        [w16, ids],
    )
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    [(name, array)] = prepare_refit(path, {"w16": np.full((2, 3), 0.1, np.float32)})
    assert name == "w16" and array.dtype == np.float16 and array[0, 0] == np.float16(0.1)
    with pytest.raises(InputError, match="'ids' is float32, the engine's weight is int64"):
        prepare_refit(path, {"ids": np.zeros(2, np.float32)})


def test_refittable_builds_need_the_cuda_driver_with_rtx_1_7(rtx, tiny_sd3_bundle, tmp_path):
    """TensorRT-RTX 1.7's builder compiles refittable engines with the CUDA driver; where there is none
    the build fails, and the error says so. With a driver the engine records its refittable weights."""
    import ctypes.util
    import shutil

    from latentrt.engines import BuildConfig, build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    config = BuildConfig(target="tensorrt-rtx", components=("text_encoder_3",), opt_level=0, weights="refittable", compute_capabilities=("8.9",))
    if ctypes.util.find_library("cuda") is None:
        with pytest.raises(BuildError) as err:
            build_engines(bundle, config)
        assert "compiles refittable engines with the CUDA driver, which this machine lacks" in str(err.value)
        assert not list(bundle.glob("engines/*.json"))
    else:
        [result] = build_engines(bundle, config)
        assert result.record.spec.flags["weights"] == "refittable"
        assert result.record.refit["mode"] == "refittable" and result.record.refit["weights"]


def test_weights_mode_is_part_of_the_key(rtx, tiny_sd3_bundle):
    from latentrt.engines import BuildConfig, plan_engines

    keys = {
        mode: plan_engines(tiny_sd3_bundle, BuildConfig(target="tensorrt-rtx", components=("vae_decoder",), weights=mode))[0].spec
        for mode in ("embedded", "refittable", "stripped")
    }
    assert len({spec.key for spec in keys.values()}) == 3
    assert {spec.flags["weights"] for spec in keys.values()} == {"embedded", "refittable", "stripped"}
    assert all(spec.flags["user_allocation"] for spec in keys.values())  # RTX: REQUIRE_USER_ALLOCATION, for CUDA graphs
