"""`latentrt triton-repo`: the written repository, and the real tritonserver serving it (tiny-sd3)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from latentrt.cli.main import main
from latentrt.errors import InputError
from latentrt.serve.repository import ModelConfig, write_repository


def test_repository_layout_and_config(tiny_sd3_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_sd3_bundle), "-o", str(repo), "--model-name", "sd3", "--instances", "3", "--max-queue-delay-ms", "20"]) == 0
    assert f"wrote {repo}" in capsys.readouterr().out
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file() and "bundle" not in p.parts) == [
        "README.md", "sd3/1/model.py", "sd3/config.pbtxt"]
    copied = repo / "sd3" / "1" / "bundle"
    assert json.loads((copied / "manifest.json").read_text()) == json.loads((tiny_sd3_bundle / "manifest.json").read_text())
    assert "from latentrt.serve.model import TritonPythonModel" in (repo / "sd3" / "1" / "model.py").read_text()
    config = (repo / "sd3" / "config.pbtxt").read_text()
    assert 'name: "sd3"' in config and 'backend: "python"' in config
    assert "max_batch_size: 4" in config  # tiny-sd3's denoiser takes 8 rows: 4 images with guidance
    assert "instance_group [ { kind: KIND_CPU count: 3 } ]" in config
    assert "max_queue_delay_microseconds: 20000" in config
    assert '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }' in config
    assert '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }' in config
    assert '{ name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }' in config
    assert re.search(r'key: "bundle" value: \{ string_value: "bundle" \}', config)
    readme = (repo / "README.md").read_text()
    for needle in ("tritonserver --model-repository", "/v2/models/sd3/infer", "KServe", "load balancer", "numpy<2", "/v2/health/ready"):
        assert needle in readme


def test_gpu_instances_for_tensorrt_and_refusals(tiny_sd3_bundle, tmp_path):
    from latentrt.bundle.manifest import load_manifest
    from latentrt.serve.repository import model_config_pbtxt

    config = model_config_pbtxt(ModelConfig(backend="tensorrt", instances=2, max_batch=1), load_manifest(tiny_sd3_bundle), "bundle")
    assert "instance_group [ { kind: KIND_GPU count: 2 } ]" in config and "max_batch_size: 1" in config
    with pytest.raises(InputError, match="has no TensorRT engines; build them first"):
        write_repository(tiny_sd3_bundle, tmp_path / "trt", ModelConfig(backend="tensorrt"))
    assert not (tmp_path / "trt").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(InputError, match="is not empty; pass --overwrite"):
        write_repository(tiny_sd3_bundle, tmp_path / "full")
    for bad, message in [(dict(name="a b"), "not usable in URLs"), (dict(instances=0), "instances must be >= 1"),
                         (dict(max_batch=0), "max_batch must be >= 1"), (dict(max_steps=0), "max_steps must be >= 1")]:
        with pytest.raises(InputError, match=message):
            ModelConfig(**bad)


def test_tritonserver_serves_the_written_repository(tiny_sd3_bundle, tmp_path, serve_env, infer, free_ports):
    from latentrt.runtime.pipeline import Pipeline
    from latentrt.serve.server import ServerConfig, TritonServer

    repo = write_repository(tiny_sd3_bundle, tmp_path / "repo", ModelConfig(threads=1, max_steps=30))
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics), python_env=serve_env) as server:
        assert server.ready()
        rows = {"prompt": ["a red cat"], "seed": [3], "num_inference_steps": [2], "height": [64], "width": [96]}
        images, timings = infer(f"127.0.0.1:{http}", "latentrt", rows, "http")
        images_grpc, _ = infer(f"127.0.0.1:{grpc}", "latentrt", rows, "grpc")
    assert not server.running() and not server.workspace.exists()
    expected = Pipeline.load(repo / "latentrt" / "1" / "bundle", threads=1)("a red cat", num_inference_steps=2, seed=3, height=64, width=96)
    np.testing.assert_array_equal(images[0], np.asarray(expected.images[0]))
    np.testing.assert_array_equal(images_grpc[0], images[0])
    assert timings[0]["seed"] == 3
