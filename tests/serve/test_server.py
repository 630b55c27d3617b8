"""`latentrt serve` on the demo bundle: the real tritonserver, real clients (tritonclient HTTP and gRPC)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

STEPS = 4
GUIDANCE = 3.0


def reference(pipe, prompt, seed, *, steps=STEPS, guidance=GUIDANCE, negative=None, height=None, width=None) -> np.ndarray:
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, seed=seed, height=height, width=width)
    return np.asarray(out.images[0])


def row(prompt, seed, *, steps=STEPS, guidance=GUIDANCE, **more) -> dict:
    return {"prompt": [prompt], "seed": [seed], "num_inference_steps": [steps], "guidance_scale": [guidance], **{k: [v] for k, v in more.items()}}


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics, timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf'^{name}{{model="{server.model}",version="1"}} (\S+)$', text, re.M)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


def post(server, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http}/v2/models/{server.model}/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]


def test_health_metadata_and_config(demo_server):
    import tritonclient.http as client

    c = client.InferenceServerClient(demo_server.http)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("latentrt")
    meta = c.get_model_metadata("latentrt")
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {
        "prompt": ("BYTES", [-1, 1]), "negative_prompt": ("BYTES", [-1, 1]), "seed": ("INT64", [-1, 1]),
        "num_inference_steps": ("INT32", [-1, 1]), "guidance_scale": ("FP32", [-1, 1]), "height": ("INT32", [-1, 1]), "width": ("INT32", [-1, 1]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {"image": ("UINT8", [-1, -1, -1, 3]), "timings": ("BYTES", [-1, 1])}
    config = c.get_model_config("latentrt")
    assert config["max_batch_size"] == 4 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 100_000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_alone_is_the_python_api_bit_for_bit(demo_server, demo_pipeline, infer, protocol):
    url = demo_server.http if protocol == "http" else demo_server.grpc
    images, timings = infer(url, "latentrt", row("a large red circle on the left", 7), protocol)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], reference(demo_pipeline, "a large red circle on the left", 7))
    assert timings[0]["seed"] == 7 and timings[0]["batch_size"] == 1 and timings[0]["num_inference_steps"] == STEPS
    assert timings[0]["pipeline_ms"] > timings[0]["denoising_ms"] > 0


def test_defaults_come_from_the_manifest_and_negative_prompts_apply(demo_server, demo_pipeline, infer):
    images, timings = infer(demo_server.http, "latentrt", {"prompt": ["a small blue square at the top"], "seed": [3], "num_inference_steps": [STEPS]})
    d = demo_pipeline.manifest.defaults
    np.testing.assert_array_equal(images[0], reference(demo_pipeline, "a small blue square at the top", 3, guidance=d.guidance_scale))
    images, _ = infer(demo_server.http, "latentrt", row("a big white circle on the right", 4, negative_prompt="a grey background", height=48, width=32))
    assert images.shape == (1, 48, 32, 3)
    np.testing.assert_array_equal(
        images[0], reference(demo_pipeline, "a big white circle on the right", 4, negative="a grey background", height=48, width=32)
    )
    _, timings = infer(demo_server.http, "latentrt", {"prompt": ["x"], "num_inference_steps": [1]})
    assert 0 <= timings[0]["seed"] < 2**63  # drawn by the server, returned so the image can be made again


def test_concurrent_clients_are_batched_and_match_the_python_api(demo_server, demo_pipeline, infer):
    prompts = ["a large red circle on the left", "a small green circle in the centre", "right: big yellow triangle",
               "a large purple square at the bottom", "a small red triangle at the top", "left: small orange triangle"]
    executions = metric(demo_server, "nv_inference_exec_count")
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(
            lambda i: infer(demo_server.http if i % 2 else demo_server.grpc, "latentrt", row(prompts[i], 100 + i), "http" if i % 2 else "grpc"),
            range(len(prompts)),
        ))
    batches = metric(demo_server, "nv_inference_exec_count") - executions
    assert batches < len(prompts), "dynamic batching ran every request alone"
    assert max(t[0]["batch_size"] for _, t in results) > 1
    for i, (images, timings) in enumerate(results):
        expected = reference(demo_pipeline, prompts[i], 100 + i)
        diff = np.abs(images[0].astype(int) - expected).max()
        assert diff <= 2, f"client {i}: {diff}/255 from the Python API (batch of {timings[0]['batch_size']})"
        if timings[0]["batch_size"] == 1:
            assert diff == 0


def test_requests_that_differ_are_grouped_never_mixed(demo_server, demo_pipeline, infer):
    variants = [dict(steps=2), dict(steps=3), dict(steps=2, height=32, width=32), dict(steps=2, guidance=1.0), dict(steps=3)]
    with ThreadPoolExecutor(len(variants)) as pool:
        results = list(pool.map(
            lambda v: infer(demo_server.http, "latentrt", row("a small blue square at the top", 11, **v)), variants
        ))
    for variant, (images, timings) in zip(variants, results):
        assert timings[0]["num_inference_steps"] == variant["steps"]
        expected = reference(demo_pipeline, "a small blue square at the top", 11, **{k: v for k, v in variant.items()})
        assert images[0].shape == expected.shape
        assert np.abs(images[0].astype(int) - expected).max() <= 2


def test_several_rows_in_one_request(demo_server, demo_pipeline, infer):
    images, timings = infer(demo_server.http, "latentrt", {
        "prompt": ["a large red circle on the left", "a small red triangle at the top"], "seed": [1, 2],
        "num_inference_steps": [STEPS, STEPS], "guidance_scale": [GUIDANCE, GUIDANCE],
    })
    assert images.shape == (2, 64, 64, 3) and [t["seed"] for t in timings] == [1, 2]
    for image, prompt, seed in zip(images, ["a large red circle on the left", "a small red triangle at the top"], [1, 2]):
        assert np.abs(image.astype(int) - reference(demo_pipeline, prompt, seed)).max() <= 2


def _tensor(name, datatype, value):
    return {"name": name, "datatype": datatype, "shape": [1, 1], "data": [value]}


PROMPT = _tensor("prompt", "BYTES", "a red circle")


@pytest.mark.parametrize(
    "inputs,message",
    [
        ([_tensor("seed", "INT64", 1)], "input 'prompt' is missing"),
        ([PROMPT, _tensor("seed", "FP32", 1.5)], "expects 'INT64'"),
        ([PROMPT, _tensor("num_inference_steps", "INT32", 0)], "num_inference_steps must be >= 1 and <= 10000, got 0"),
        ([PROMPT, _tensor("num_inference_steps", "INT32", 41)], "above this server's limit of 40"),
        ([PROMPT, _tensor("height", "INT32", 100)], "height 100 is not valid for this bundle: it must be a multiple of 8 between 16 and 64; the nearest valid height is 64"),
        ([PROMPT, _tensor("width", "INT32", 8)], "the nearest valid width is 16"),
        ([_tensor("prompt", "BYTES", "x" * 100_000)], "prompt is 100000 bytes long; this server accepts at most 4096"),
        ([PROMPT, _tensor("seed", "INT64", -1)], "seed must be between 0 and"),
    ],
    ids=["missing-prompt", "wrong-dtype", "zero-steps", "too-many-steps", "bad-height", "small-width", "100kb-prompt", "negative-seed"],
)
def test_malformed_requests_get_400_and_the_server_keeps_serving(demo_server, inputs, message):
    status, error = post(demo_server, {"inputs": inputs})
    assert status == 400 and message in error, (status, error)
    status, body = post(demo_server, {"inputs": [PROMPT, _tensor("num_inference_steps", "INT32", 1)], "outputs": [{"name": "timings"}]})
    assert status == 200 and json.loads(json.loads(body)["outputs"][0]["data"][0])["num_inference_steps"] == 1


def test_nan_guidance_gets_400(demo_server, infer):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="guidance_scale must be a finite number, got nan") as err:
        infer(demo_server.http, "latentrt", row("x", 1, guidance=float("nan")))  # binary tensors carry NaN; JSON cannot
    assert err.value.status() == "400"


def test_the_python_api_raises_the_same_messages(demo_pipeline):
    from latentrt.errors import InputError

    for kwargs, message in [(dict(num_inference_steps=0), "num_inference_steps must be >= 1 and <= 10000, got 0"),
                            (dict(height=100), "the nearest valid height is 64"), (dict(width=8), "the nearest valid width is 16")]:
        with pytest.raises(InputError, match=re.escape(message)):
            demo_pipeline("a red circle", **kwargs)


def test_a_bad_row_in_a_batch_fails_alone(demo_server, demo_pipeline, infer):
    from tritonclient.utils import InferenceServerException

    def call(i):
        try:
            return infer(demo_server.http, "latentrt", row("a large red circle on the left", 50 + i, steps=STEPS if i != 1 else 99))
        except InferenceServerException as err:
            return err

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert isinstance(results[1], InferenceServerException) and results[1].status() == "400"
    assert "above this server's limit" in results[1].message()
    for i in (0, 2, 3):
        images, _ = results[i]
        assert np.abs(images[0].astype(int) - reference(demo_pipeline, "a large red circle on the left", 50 + i)).max() <= 2


CLIENT = """
import sys, numpy as np, tritonclient.http as h
c = h.InferenceServerClient(sys.argv[1])
i = [h.InferInput("prompt", [1, 1], "BYTES"), h.InferInput("num_inference_steps", [1, 1], "INT32")]
i[0].set_data_from_numpy(np.array([[b"a slow one"]], dtype=object)); i[1].set_data_from_numpy(np.array([[40]], np.int32))
print("sending", flush=True)
c.infer("latentrt", i)
"""


def test_a_client_killed_mid_request_leaves_the_server_healthy(demo_server, demo_pipeline, infer):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, demo_server.http], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "sending"
    time.sleep(0.3)
    client.kill()
    client.wait()
    assert demo_server.ready()
    images, _ = infer(demo_server.http, "latentrt", row("a large red circle on the left", 9))
    np.testing.assert_array_equal(images[0], reference(demo_pipeline, "a large red circle on the left", 9))


def test_prometheus_metrics_count_requests(demo_server, infer):
    before = {name: metric(demo_server, name) for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")}
    infer(demo_server.http, "latentrt", row("x", 1, steps=1))
    assert post(demo_server, {"inputs": [PROMPT, _tensor("num_inference_steps", "INT32", 0)]})[0] == 400
    assert post(demo_server, {"inputs": [PROMPT, _tensor("seed", "FP32", 1.0)]})[0] == 400  # rejected by Triton itself
    after = {name: metric(demo_server, name) for name in before}
    # Triton counts the requests the model answered, a 400 from the model included; its own rejections not.
    assert after["nv_inference_request_success"] == before["nv_inference_request_success"] + 2
    assert after["nv_inference_count"] == before["nv_inference_count"] + 2
    assert after["nv_inference_exec_count"] - before["nv_inference_exec_count"] in (1, 2)
    with urllib.request.urlopen(demo_server.metrics, timeout=10) as r:
        text = r.read().decode()
    assert 'nv_inference_queue_duration_us{model="latentrt",version="1"}' in text
    assert 'nv_inference_compute_infer_duration_us{model="latentrt",version="1"}' in text
