"""Triton model repositories: a bundle as a Python-backend model with dynamic batching.

    REPO/
      README.md                  how to run it and scale it out
      <model>/config.pbtxt       inputs, outputs, batching, instance groups, parameters
      <model>/1/model.py         `from latentrt.serve.model import TritonPythonModel`
      <model>/1/bundle/          a copy of the bundle (`write_repository`)

`latentrt serve` writes the same model into a temporary repository whose `bundle` parameter points
at the bundle in place (`write_model`); `latentrt triton-repo` writes a self-contained one for a
standalone tritonserver (`write_repository`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentrt.bundle.manifest import Manifest, load_manifest
from latentrt.bundle.writer import writing_bundle
from latentrt.errors import InputError
from latentrt.runtime.families import FAMILIES
from latentrt.serve.batch import INPUTS, OUTPUTS, REQUIRED, Limits, RequestParser

Backend = Literal["onnxruntime", "tensorrt"]
_TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8"}

MODEL_PY = '''"""latentrt on Triton's Python backend: the bundle's torch-free pipeline (see latentrt/serve/model.py)."""

from latentrt.serve.model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class ModelConfig:
    """How Triton serves a bundle.

    Attributes:
        name: the model's name in URLs (`/v2/models/<name>/infer`).
        backend: the runtime backend each instance loads; "tensorrt" runs instances on GPUs
            (`KIND_GPU`, engines built by `latentrt build`), "onnxruntime" on the CPU (`KIND_CPU`).
        max_batch: the most images Triton's dynamic batcher hands one execution; None: the most one
            pipeline call runs with guidance (the bundle's batch ranges).
        max_queue_delay_ms: how long the batcher may hold a request to fill a batch.
        instances: model instances (each its own process with its own pipeline) per device.
        threads: ONNX Runtime intra-op threads per instance (0: ONNX Runtime's choice, all cores).
        max_steps, max_prompt_bytes: request limits (`serve.batch.Limits`).
    """

    name: str = "latentrt"
    backend: Backend = "onnxruntime"
    max_batch: int | None = None
    max_queue_delay_ms: float = 5.0
    instances: int = 1
    threads: int = 0
    max_steps: int = 100
    max_prompt_bytes: int = 4096

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            raise InputError(f"model name {self.name!r} is not usable in URLs and paths; use letters, digits, '_', '.', '-'")
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise InputError(f"backend must be 'onnxruntime' or 'tensorrt', got {self.backend!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_ms < 0:
            raise InputError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.instances < 1:
            raise InputError(f"instances must be >= 1, got {self.instances}")
        if self.threads < 0:
            raise InputError(f"threads must be >= 0 (0: ONNX Runtime's choice), got {self.threads}")
        Limits(self.max_steps, self.max_prompt_bytes)  # validates them

    def batch_size(self, manifest: Manifest) -> int:
        """`max_batch`, or the most images one pipeline call takes with guidance."""
        if self.max_batch is not None:
            return self.max_batch
        denoiser = manifest.components[FAMILIES[manifest.family].denoiser].axes["batch"].max
        return max(1, min(denoiser // 2, manifest.components["vae_decoder"].axes["batch"].max))


def model_config_pbtxt(config: ModelConfig, manifest: Manifest, bundle: str) -> str:
    """config.pbtxt for the model; `bundle` is the path the model loads (relative to its version folder)."""
    inputs = ",\n".join(
        f'  {{ name: "{name}" data_type: {_TRITON_TYPES[datatype]} dims: [ 1 ]{"" if name in REQUIRED else " optional: true"} }}'
        for name, (datatype, _) in INPUTS.items()
    )
    out_dims = {"image": "[ -1, -1, 3 ]", "timings": "[ 1 ]"}
    outputs = ",\n".join(f'  {{ name: "{name}" data_type: {_TRITON_TYPES[t]} dims: {out_dims[name]} }}' for name, t in OUTPUTS.items())
    kind = "KIND_GPU" if config.backend == "tensorrt" else "KIND_CPU"
    params = {
        "bundle": bundle,
        "backend": config.backend,
        "threads": str(config.threads),
        "max_steps": str(config.max_steps),
        "max_prompt_bytes": str(config.max_prompt_bytes),
    }
    parameters = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{_escape(v)}" }} }}' for k, v in params.items())
    return (
        f"# Written by latentrt {_version()} for a {manifest.family} bundle; see README.md beside the model folder.\n"
        f'name: "{config.name}"\n'
        f'backend: "python"\n'
        f"max_batch_size: {config.batch_size(manifest)}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"instance_group [ {{ kind: {kind} count: {config.instances} }} ]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(config.max_queue_delay_ms * 1000)} }}\n"
        f"parameters [\n{parameters}\n]\n"
    )


def write_model(repository: str | os.PathLike, bundle: str | os.PathLike, config: ModelConfig, *, manifest: Manifest | None = None) -> Path:
    """Write `<repository>/<name>/` (config.pbtxt, 1/model.py) for a bundle loaded in place; returns the model folder."""
    bundle = Path(bundle).resolve()
    manifest = manifest or checked_manifest(bundle, config)
    model = Path(repository) / config.name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(model_config_pbtxt(config, manifest, str(bundle)))
    (model / "1" / "model.py").write_text(MODEL_PY)
    return model


def write_repository(bundle: str | os.PathLike, output: str | os.PathLike, config: ModelConfig = ModelConfig(), *, overwrite: bool = False) -> Path:
    """Write a self-contained Triton model repository serving `bundle` (copied into it).

    The repository runs on any tritonserver with the Python backend whose Python environment has
    latentrt installed (see the README written into it). Written to a temporary sibling and renamed:
    a failed write leaves nothing behind.

    Example:
        >>> write_repository("out/demo-bundle", "out/triton-repo", ModelConfig(instances=2))  # doctest: +SKIP
    """
    bundle = Path(bundle)
    manifest = checked_manifest(bundle, config)
    output = Path(output)
    with writing_bundle(output, overwrite=overwrite) as tmp:
        model = tmp / config.name
        (model / "1").mkdir(parents=True)
        shutil.copytree(bundle, model / "1" / "bundle", ignore=shutil.ignore_patterns(".*"))
        (model / "config.pbtxt").write_text(model_config_pbtxt(config, manifest, "bundle"))
        (model / "1" / "model.py").write_text(MODEL_PY)
        (tmp / "README.md").write_text(_readme(config, manifest))
    return output


def checked_manifest(bundle: str | os.PathLike, config: ModelConfig) -> Manifest:
    """The bundle's manifest (files verified), and its engines when `config` serves them with TensorRT."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)  # checks the schema and every file's sha256
    RequestParser(manifest, Limits(config.max_steps, config.max_prompt_bytes))  # the defaults within the limits
    if config.backend == "tensorrt" and not any((bundle / "engines").glob("*.engine")):
        raise InputError(f"{bundle} has no TensorRT engines; build them first (`latentrt build {bundle}`) or serve with --backend onnxruntime")
    return manifest


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _version() -> str:
    from latentrt._version import __version__

    return __version__


def _readme(config: ModelConfig, manifest: Manifest) -> str:
    name = config.name
    device = "GPU (one instance group per visible GPU, `count` instances each)" if config.backend == "tensorrt" else "CPU"
    d = manifest.defaults
    return f"""# Triton model repository: `{name}`

Written by `latentrt triton-repo` (latentrt {_version()}). One Python-backend model, `{name}`, runs the
{manifest.family} bundle in `{name}/1/bundle/` with latentrt's torch-free runtime on
{config.backend} ({device}). Requests are KServe v2 (HTTP and gRPC); Triton's dynamic batcher hands a
model instance up to {config.batch_size(manifest)} images at a time (`max_batch_size`), held at most
{config.max_queue_delay_ms:g} ms (`dynamic_batching`), and the model runs requests that share steps,
guidance and size as one pipeline call.

## Inputs and outputs (one row per image)

| input | datatype | shape | default |
|---|---|---|---|
| prompt | BYTES | [n, 1] | required |
| negative_prompt | BYTES | [n, 1] | none |
| seed | INT64 | [n, 1] | random (returned in `timings`) |
| num_inference_steps | INT32 | [n, 1] | {d.num_inference_steps} (at most {config.max_steps}) |
| guidance_scale | FP32 | [n, 1] | {d.guidance_scale:g} |
| height | INT32 | [n, 1] | {d.height} |
| width | INT32 | [n, 1] | {d.width} |

Outputs: `image` UINT8 [n, height, width, 3]; `timings` BYTES [n, 1], a JSON object per row (seed,
batch size, stage times in ms). A bad row (0 steps, a size outside the bundle's ranges, ...) fails its
request with HTTP 400 / gRPC INVALID_ARGUMENT and the reason; other requests in the batch run.

## Run it

The Python backend runs `model.py` in the Python of the tritonserver installation; that Python needs
latentrt and its runtime dependencies (numpy, onnxruntime, tokenizers, pillow). Triton releases whose
Python-backend stub was built against NumPy 1.x need `numpy<2` there: the model refuses to load, with
that message, when the stub and NumPy disagree.

```sh
# NVIDIA's container (pick a release; its Python is the one the stub links)
docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 {"--gpus all " if config.backend == "tensorrt" else ""}-v $PWD:/models \\
    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
    bash -c "pip install latentrt{'[tensorrt]' if config.backend == 'tensorrt' else ''} && tritonserver --model-repository /models"

# or any tritonserver with the Python backend, e.g. the one in the `nvidia-pytriton` wheel
# (`latentrt serve BUNDLE` does this for you, including the Python set-up)
tritonserver --model-repository .
```

Then:

```sh
curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{{http_code}}\\n'     # 200 once the model is loaded
curl -s -X POST localhost:8000/v2/models/{name}/infer -d '{{"inputs": [
  {{"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["a large red circle on the left"]}},
  {{"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [0]}}]}}'
curl -s localhost:8002/metrics | grep nv_inference_request_success                 # Prometheus metrics
```

## Scale it out

- **Within a node**: raise `count` in `instance_group` (each instance is its own process with its own
  pipeline{"; for GPU instances, one group per GPU, e.g. `gpus: [0, 1]`" if config.backend == "tensorrt" else ""}) and
  `max_batch_size` / `max_queue_delay_microseconds` to trade latency for throughput.
- **Across nodes**: run N identical replicas behind a load balancer (the same repository on each,
  baked into an image or read from object storage with `--model-repository s3://...`): the model
  keeps no state between requests, so any replica can take any request. Use
  `/v2/health/ready` as the readiness probe and `/v2/health/live` as the liveness probe, and scrape
  `:8002/metrics` (`nv_inference_queue_duration_us` rising is the signal to add replicas).
- **KServe**: an `InferenceService` with the Triton runtime serves this repository as is:

```yaml
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name.replace("_", "-").replace(".", "-").lower()}
spec:
  predictor:
    minReplicas: 1
    maxReplicas: 8
    triton:
      storageUri: s3://<bucket>/<this repository>
      runtimeVersion: <yy.mm>-py3
```

(the container must have latentrt installed: build an image `FROM nvcr.io/nvidia/tritonserver:<yy.mm>-py3`
with `RUN pip install latentrt` and set it as the predictor's image).
"""
