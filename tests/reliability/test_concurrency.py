"""Concurrency: one Pipeline called from several threads with different shapes and T5 lengths gives
each call exactly the image it gives alone; two writers of one new output: the second fails."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from latentrt.runtime.pipeline import Pipeline
from latentrt.runtime.tokenizer import PromptTokenizer

# (prompt, negative prompt, height, width, steps, T5 length, seed): every call differs in shape.
REQUESTS = [
    ("a red cat", None, 64, 64, 2, 16, 0),
    ("a blue dog on the left", "blurry", 64, 96, 2, 64, 1),
    ("a large green square", "", 96, 64, 3, 0, 2),
    ("two small yellow circles at the top", None, 64, 64, 2, 256, 3),
    ("a purple triangle", "ugly", 96, 96, 2, 32, 4),
    ("a white circle on a black background", None, 64, 128, 1, 120, 5),
]


def _call(pipe, request):
    prompt, negative, height, width, steps, length, seed = request
    return pipe([prompt, prompt + " again"], negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                max_sequence_length=length, seed=seed, guidance_scale=4.0).pixels


@pytest.fixture(scope="module")
def pipe(tiny_sd3_bundle):
    return Pipeline.load(tiny_sd3_bundle)


@pytest.fixture(scope="module")
def alone(pipe):
    """Each request's pixels when it runs by itself."""
    return [_call(pipe, r) for r in REQUESTS]


def test_one_pipeline_from_four_threads(pipe, alone):
    order = list(itertools.islice(itertools.cycle(range(len(REQUESTS))), 36))
    start = threading.Barrier(4)

    def work(i: int):
        if i < 4:
            start.wait()  # the first four calls start together
        return i, _call(pipe, REQUESTS[i % len(REQUESTS)])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, order))
    for i, pixels in results:
        np.testing.assert_array_equal(pixels, alone[i % len(REQUESTS)], err_msg=f"request {i % len(REQUESTS)} differs when run concurrently")


class _Serial:
    """Wraps a real engine without declaring `concurrent_calls` (as the TensorRT engine, whose device
    buffers are shared); records how many calls run at once."""

    def __init__(self, engine, counter):
        self.engine, self.counter = engine, counter
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def __call__(self, feeds):
        with self.counter["lock"]:
            self.counter["now"] += 1
            self.counter["most"] = max(self.counter["most"], self.counter["now"])
        try:
            return self.engine(feeds)
        finally:
            with self.counter["lock"]:
                self.counter["now"] -= 1

    def close(self):
        self.engine.close()


def test_engines_that_are_not_thread_safe_get_one_call_at_a_time(pipe, alone):
    counter = {"lock": threading.Lock(), "now": 0, "most": 0}
    serial = Pipeline(pipe.bundle, pipe.manifest, {name: _Serial(e, counter) for name, e in pipe.engines.items()})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: (i, _call(serial, REQUESTS[i])), range(len(REQUESTS))))
    assert counter["most"] == 1
    for i, pixels in results:
        np.testing.assert_array_equal(pixels, alone[i])


def test_tokenizer_with_different_lengths_from_threads(tiny_sd3_bundle):
    tok = PromptTokenizer(tiny_sd3_bundle / "tokenizer_3" / "tokenizer.json", max_length=256, pad_id=0)
    prompts = ["a red cat " * k for k in range(1, 30)]
    lengths = [3, 7, 16, 77, 256, 512]
    expected = {n: tok.with_mask(prompts, n) for n in lengths}
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda n: (n, tok.with_mask(prompts, n)), lengths * 20))
    for n, (ids, mask) in got:
        np.testing.assert_array_equal(ids, expected[n][0])
        np.testing.assert_array_equal(mask, expected[n][1])


def test_two_exports_to_one_new_path(tiny_sd3_dir, tmp_path, run_stopped, run_cli):
    """The first export is stopped while it writes; a second one to the same path fails at once with
    exit 2 (without --overwrite and with it); the first then finishes."""
    out = tmp_path / "out"
    first = run_stopped(r"^writing bundle ", "cli", "export", tiny_sd3_dir, "-o", out)
    for extra in ([], ["--overwrite"]):
        second = run_cli("export", tiny_sd3_dir, "-o", out, *extra)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()[-1]
        assert err.startswith("error: another process") and f"pid {first.proc.pid}" in err and f"is writing {out}" in err
    code, err = first.resume()
    assert code == 0, err
    assert Pipeline.load(out).manifest.family == "sd3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
