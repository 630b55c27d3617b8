"""The Triton Python-backend model: a bundle's `Pipeline` behind KServe v2 requests.

A model repository written by `write_repository` holds a two-line `model.py` that re-exports
`TritonPythonModel` from here. Triton runs each model instance in its own stub process, which imports
this module with `triton_python_backend_utils` on its path; nothing here runs outside that process
except through `serve/batch.py`, which holds the logic (and its tests).

Parameters read from config.pbtxt (`parameters { key: ... value: { string_value: ... } }`):
`bundle` (a path, relative to the model version's folder or absolute), `backend` (onnxruntime |
tensorrt), `threads` (ONNX Runtime intra-op threads, 0: its choice), `max_steps`, `max_prompt_bytes`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from latentrt.errors import InputError, LatentRTError
from latentrt.serve.batch import INPUTS, Limits, RequestParser, run_batch

logger = logging.getLogger(__name__)


class TritonPythonModel:
    """Triton's Python-backend interface: `initialize(args)`, `execute(requests)`, `finalize()`."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils  # only importable inside Triton's stub process

        self.pb = pb_utils
        check_numpy_abi(pb_utils)
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        bundle = Path(params["bundle"])
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / args["model_version"] / bundle
        device = int(args.get("model_instance_device_id", 0)) if args.get("model_instance_kind") == "GPU" else 0
        self.pipeline = load_pipeline(bundle, params.get("backend", "onnxruntime"), threads=int(params.get("threads", 0)), device=device)
        limits = Limits(**{key: int(params[key]) for key in ("max_steps", "max_prompt_bytes") if key in params})
        self.parser = RequestParser(self.pipeline.manifest, limits)
        logger.info("%s: serving %s (%s, device %d)", args.get("model_instance_name"), bundle, params.get("backend"), device)

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad request gets a 400 alone, its neighbours run."""
        pb = self.pb
        parsed: list = []
        for request in requests:
            try:
                tensors = {name: _as_numpy(pb.get_input_tensor_by_name(request, name)) for name in INPUTS}
                parsed.append(self.parser.parse(tensors))
            except InputError as err:
                parsed.append(err)
            except Exception as err:  # noqa: BLE001 - an exception escaping execute() fails every request of the batch
                parsed.append(InputError(f"could not read the request's tensors: {err}"))
        valid = [rows for rows in parsed if not isinstance(rows, Exception)]
        outcomes = iter(run_batch(self.pipeline, valid))
        responses = []
        for rows in parsed:
            outcome = rows if isinstance(rows, Exception) else next(outcomes)
            if isinstance(outcome, Exception):
                code = pb.TritonError.INVALID_ARG if isinstance(outcome, InputError) else pb.TritonError.INTERNAL
                if code == pb.TritonError.INTERNAL:
                    logger.error("generation failed: %r", outcome)
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(outcome), code)))
                continue
            image = np.stack([r.image for r in outcome])
            timings = np.array([[r.timings_json()] for r in outcome], dtype=np.object_)
            responses.append(pb.InferenceResponse([pb.Tensor("image", image), pb.Tensor("timings", timings)]))
        return responses

    def finalize(self) -> None:
        pipeline = getattr(self, "pipeline", None)
        for engine in pipeline.engines.values() if pipeline is not None else ():
            engine.close()


def load_pipeline(bundle: Path, backend: str, *, threads: int = 0, device: int = 0):
    """`Pipeline.load` with a CUDA device ordinal (each GPU instance runs on its own device)."""
    from latentrt.bundle.manifest import load_manifest
    from latentrt.runtime.backends import load_engines
    from latentrt.runtime.engine import BackendOptions
    from latentrt.runtime.pipeline import Pipeline

    manifest = load_manifest(bundle)
    return Pipeline(bundle, manifest, load_engines(backend, bundle, manifest, BackendOptions(threads=threads, device=device)))


def check_numpy_abi(pb_utils) -> None:
    """Fail at load time, with the fix, when the stub's compiled NumPy support predates NumPy 2.

    Triton's Python-backend stub (pybind11) built for NumPy 1.x reads NumPy 2's arrays with the wrong
    layout: BYTES inputs arrive as their first byte repeated and the stub process dies on the first
    request. Such a pybind11 imports `numpy.core.multiarray` (NumPy 2: `numpy._core`) the first time
    the stub makes an array, which a tensor round trip shows before any request does.
    """
    if int(np.__version__.split(".")[0]) < 2 or "numpy.core.multiarray" in sys.modules:
        return
    pb_utils.Tensor("probe", np.zeros(1, np.uint8)).as_numpy()
    if "numpy.core.multiarray" in sys.modules:
        raise LatentRTError(
            f"Triton's Python-backend stub was built for NumPy 1.x and misreads this environment's NumPy "
            f"{np.__version__} arrays: install numpy<2 in the environment the model runs in "
            f"(`pip install 'numpy<2'`), or use a Triton release whose stub supports NumPy 2"
        )


def _as_numpy(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.as_numpy()
