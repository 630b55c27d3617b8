"""The serving logic without a server: request checks, grouping, and parity with `Pipeline.__call__` (tiny-sd3)."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.errors import InputError
from latentrt.runtime.pipeline import Pipeline
from latentrt.serve.batch import Limits, RequestParser, Row, run_batch


@pytest.fixture(scope="module")
def pipe(tiny_sd3_bundle):
    return Pipeline.load(tiny_sd3_bundle, threads=1)


@pytest.fixture(scope="module")
def parser(pipe):
    return RequestParser(pipe.manifest, Limits(max_steps=30, max_prompt_bytes=64))


def col(*values, dtype=None):
    if dtype is None:
        dtype = np.object_ if isinstance(values[0], (str, bytes)) else None
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=dtype)


def test_defaults_come_from_the_manifest(pipe, parser):
    (row,) = parser.parse({"prompt": col("a red cat")})
    d = pipe.manifest.defaults
    assert (row.prompt, row.negative_prompt, row.num_inference_steps, row.guidance_scale, row.height, row.width) == (
        "a red cat", None, d.num_inference_steps, d.guidance_scale, d.height, d.width)
    assert 0 <= row.seed < 2**63
    assert parser.parse({"prompt": col("a red cat")})[0].seed != row.seed  # drawn per request


def test_typed_columns_become_rows(parser):
    rows = parser.parse({
        "prompt": col("a", "b"), "negative_prompt": col("blurry", ""), "seed": col(1, 2, dtype=np.int64),
        "num_inference_steps": col(2, 2, dtype=np.int32), "guidance_scale": col(3.1, 3.1, dtype=np.float32),
        "height": col(64, 64, dtype=np.int32), "width": col(96, 96, dtype=np.int32),
    })
    assert rows == [Row("a", "blurry", 1, 2, 3.1, 64, 96), Row("b", "", 2, 2, 3.1, 64, 96)]  # FP32 3.1 read as 3.1


@pytest.mark.parametrize("kwargs,tensors", [
    (dict(num_inference_steps=0), {"num_inference_steps": col(0, dtype=np.int32)}),
    (dict(height=100), {"height": col(100, dtype=np.int32)}),
    (dict(width=8), {"width": col(8, dtype=np.int32)}),
])
def test_messages_are_the_python_apis(pipe, parser, kwargs, tensors):
    with pytest.raises(InputError) as expected:
        pipe("a red cat", **kwargs)
    with pytest.raises(InputError) as got:
        parser.parse({"prompt": col("a red cat"), **tensors})
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("tensors,message", [
    ({"seed": col(1, dtype=np.int64)}, "input 'prompt' is missing"),
    ({"prompt": col("a"), "colour": col("red")}, "unknown input(s) ['colour']"),
    ({"prompt": col("a", "b"), "seed": col(1, dtype=np.int64)}, "the same number of rows"),
    ({"prompt": col("a"), "seed": col(1.0, dtype=np.float32)}, "input 'seed' has dtype float32, expected INT64"),
    ({"prompt": np.array([[b"a", b"b"]], dtype=np.object_)}, "input 'prompt' has shape [1, 2], expected [n, 1]"),
    ({"prompt": col("a"), "num_inference_steps": col(31, dtype=np.int32)}, "num_inference_steps 31 is above this server's limit of 30"),
    ({"prompt": col("a" * 65)}, "prompt is 65 bytes long; this server accepts at most 64"),
    ({"prompt": col("a"), "negative_prompt": col(b"\xff\xfe")}, "negative_prompt is not valid UTF-8"),
    ({"prompt": col("a"), "seed": col(-5, dtype=np.int64)}, "seed must be between 0 and 9223372036854775807, got -5"),
    ({"prompt": col("a"), "guidance_scale": col(np.inf, dtype=np.float32)}, "guidance_scale must be a finite number, got inf"),
    ({"prompt": col("a", "b"), "height": col(64, 32, dtype=np.int32)}, "rows of one request must share height and width"),
])
def test_bad_requests_are_input_errors(parser, tensors, message):
    with pytest.raises(InputError) as err:
        parser.parse(tensors)
    assert message in str(err.value)


def test_limits_are_checked(pipe):
    with pytest.raises(InputError, match="max_steps must be >= 1"):
        Limits(max_steps=0)
    with pytest.raises(InputError, match="the bundle's default of 28 steps is above max_steps 8"):
        RequestParser(pipe.manifest, Limits(max_steps=8))


def test_a_row_alone_is_the_python_api_bit_for_bit(pipe):
    (results,) = run_batch(pipe, [[Row("a red cat", "blurry", 5, 2, 4.0, 64, 96)]])
    expected = pipe("a red cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0, height=64, width=96, seed=5)
    np.testing.assert_array_equal(results[0].image, np.asarray(expected.images[0]))
    assert results[0].timings["batch_size"] == 1 and results[0].timings["seed"] == 5


def test_rows_are_grouped_and_handed_back_in_order(pipe):
    a = Row("a red cat", None, 1, 2, 3.0, 64, 64)
    b = Row("a blue dog", None, 2, 2, 3.0, 64, 64)
    c = Row("a green bird", None, 3, 3, 3.0, 64, 64)  # another step count: another call
    d = Row("a red cat", "blurry", 4, 2, 3.0, 64, 64)  # a negative prompt given: another call
    results = run_batch(pipe, [[a, c], [b], [d]])
    assert [[r.timings["batch_size"] for r in rs] for rs in results] == [[2, 1], [2], [1]]
    for rs, rows in zip(results, [[a, c], [b], [d]]):
        for result, r in zip(rs, rows):
            expected = pipe(r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.num_inference_steps,
                            guidance_scale=r.guidance_scale, height=r.height, width=r.width, seed=r.seed).images[0]
            diff = np.abs(result.image.astype(int) - np.asarray(expected)).max()
            assert diff <= (0 if result.timings["batch_size"] == 1 else 2) and result.timings["seed"] == r.seed


def test_a_failing_group_fails_only_its_requests(pipe):
    good = Row("a red cat", None, 1, 2, 3.0, 64, 64)
    bad = Row("a red cat", None, 1, 2, 3.0, 100, 64)  # past the parser: the pipeline itself refuses it
    results = run_batch(pipe, [[good], [bad], [good]])
    assert isinstance(results[1], InputError) and "height 100 is not valid" in str(results[1])
    assert results[0][0].timings["batch_size"] == 2
    np.testing.assert_array_equal(results[0][0].image, results[2][0].image)
