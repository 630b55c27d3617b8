"""Serving fixtures: the Python environment Triton's stub runs the model in, the demo bundle, and one
real `latentrt serve` (tritonserver) on free loopback ports for the whole package."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture(scope="session")
def free_ports():
    """`free_ports(n)`: n ports free on 127.0.0.1 now."""
    return _free_ports


@pytest.fixture(scope="session")
def serve_env():
    """The environment `make install` builds for serving (.venv/serve), or this one if it can serve."""
    from latentrt.errors import InputError
    from latentrt.serve.server import PythonEnvironment, find_python_environment, find_tritonserver

    candidates = [ROOT / ".venv" / "serve", Path(sys.prefix) / "serve"]
    try:
        env = next((PythonEnvironment.probe(c) for c in candidates if (c / "bin" / "python").exists()), None) or find_python_environment()
        find_tritonserver(env)
    except InputError as err:
        pytest.skip(f"no environment to serve from ({err}); `make install` builds one in .venv/serve")
    return env


class ServeProcess:
    """`latentrt serve` in a subprocess; `urls` once ready."""

    def __init__(self, bundle, env, *args: str, model: str = "latentrt") -> None:
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        self.model = model
        cmd = [
            sys.executable, "-m", "latentrt.cli.main", "serve", str(bundle), "--python-env", str(env.prefix), "--model-name", model,
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
            "--threads", "1", *args,
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.http = f"127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, timeout: float = 180) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"latentrt serve exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            if self.ready():
                return self
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"latentrt serve was not ready after {timeout} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return self.process.returncode, out


@pytest.fixture(scope="session")
def start_serve():
    """`start_serve(bundle, env, *args)`: `latentrt serve` in a subprocess (call `.wait_ready()`, `.stop()`)."""
    return ServeProcess


@pytest.fixture(scope="package")
def demo_server(demo_bundle, serve_env):
    """`latentrt serve` on the demo bundle: batches of up to 4 images, held up to 100 ms, at most 40 steps."""
    server = ServeProcess(demo_bundle, serve_env, "--max-batch", "4", "--max-queue-delay-ms", "100", "--max-steps", "40").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_pipeline(demo_bundle):
    """The Python API on the same bundle and backend (one thread, as the served instances run)."""
    from latentrt.runtime.pipeline import Pipeline

    return Pipeline.load(demo_bundle, threads=1)


def request_inputs(module, rows: dict, *, binary: bool = True) -> list:
    """tritonclient InferInputs from `{input name: list of row values}` (one row per image)."""
    import numpy as np

    from latentrt.serve.batch import INPUTS

    inputs = []
    for name, values in rows.items():
        datatype, dtype = INPUTS.get(name, ("FP32", np.float32))
        array = np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), datatype)
        if module.__name__.endswith("http"):
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.fixture(scope="session")
def infer():
    """`infer(url, model, rows, protocol="http")` -> (images uint8 [n, h, w, 3], timings list of dicts)."""
    import json

    def call(url: str, model: str, rows: dict, protocol: str = "http", timeout: float = 120):
        if protocol == "http":
            import tritonclient.http as client

            with contextlib.closing(client.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)) as c:
                result = c.infer(model, request_inputs(client, rows))
        else:
            import tritonclient.grpc as client

            with contextlib.closing(client.InferenceServerClient(url)) as c:
                result = c.infer(model, request_inputs(client, rows), client_timeout=timeout)
        return result.as_numpy("image"), [json.loads(t) for t in result.as_numpy("timings")[:, 0]]

    return call
