"""`latentrt serve` starting and stopping: SIGTERM (exit 0, no process left, ports and workspace freed), refusals before start, load failures reported."""

from __future__ import annotations

import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile
                pass
    return found


def _bindable(port: int) -> bool:
    """Whether a new server can listen on `port` (SO_REUSEADDR, as servers bind: connections the old
    server closed may linger in TIME_WAIT, a listener may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to list the server's processes")
def test_sigterm_stops_server_and_stubs(tiny_sd3_bundle, serve_env, start_serve, infer):
    server = start_serve(tiny_sd3_bundle, serve_env, "--instances", "2", "--max-steps", "200").wait_ready()
    banner = server.process.stdout.readline()
    workspace = re.search(r"log (\S+)/tritonserver.log", banner).group(1)
    infer(server.http, "latentrt", {"prompt": ["a red cat"], "num_inference_steps": [1], "height": [64], "width": [64]})
    running = _processes_mentioning(workspace)
    assert len(running) == 3, f"expected tritonserver and 2 stubs, found {running}"  # one stub process per instance
    def slow_request():
        result = infer(server.http, "latentrt", {"prompt": ["a blue dog"], "seed": [1], "num_inference_steps": [150]})
        return result, time.monotonic()

    with ThreadPoolExecutor(1) as pool:  # a request in flight when SIGTERM arrives finishes
        slow = pool.submit(slow_request)
        time.sleep(1.0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        (images, timings), answered = slow.result(timeout=120)
    assert answered > signalled, "the request was not in flight when SIGTERM arrived; make it slower"
    assert images.shape == (1, 128, 128, 3) and timings[0]["num_inference_steps"] == 150
    code, out = server.stop(timeout=60)
    assert code == 0 and out.strip().endswith("stopped"), out
    assert _processes_mentioning(workspace) == []
    assert not Path(workspace).exists()
    assert all(_bindable(p) for p in (server.http_port, server.grpc_port, server.metrics_port))


def test_busy_port_is_one_line_error(tiny_sd3_bundle, serve_env, capsys):
    from latentrt.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        code = main(["serve", str(tiny_sd3_bundle), "--python-env", str(serve_env.prefix), "--http-port", str(busy), "--grpc-port", "1", "--metrics-port", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: the HTTP port {busy} on 127.0.0.1 is in use; pick another \(--http-port\)", err), err


def test_limits_below_the_bundles_defaults_are_refused_before_starting(tiny_sd3_bundle, serve_env, capsys):
    from latentrt.cli.main import main

    assert main(["serve", str(tiny_sd3_bundle), "--python-env", str(serve_env.prefix), "--max-steps", "10"]) == 2
    assert "the bundle's default of 28 steps is above max_steps 10" in capsys.readouterr().err


def test_a_stub_that_cannot_read_numpy_2_refuses_to_load(tiny_sd3_bundle, serve_env, free_ports):
    """The model's own guard, for tritonservers started without `latentrt serve`'s environment checks:
    the main environment (NumPy 2) given to the NumPy-1 stub as if it could serve."""
    import dataclasses
    import sys

    import numpy as np

    from latentrt.errors import LatentRTError
    from latentrt.serve.repository import ModelConfig
    from latentrt.serve.server import ServerConfig, TritonServer

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip(f"this environment has NumPy {np.__version__}: the stub reads it")
    here = dataclasses.replace(serve_env, prefix=Path(sys.prefix), bin=Path(sys.executable).parent, numpy=np.__version__)
    http, grpc, metrics = free_ports(3)
    server = TritonServer.for_bundle(tiny_sd3_bundle, ModelConfig(), ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics), python_env=here)
    with pytest.raises(LatentRTError) as err:
        server.start()
    assert "tritonserver exited with code 1 while starting" in str(err.value)
    assert f"Python-backend stub was built for NumPy 1.x and misreads this environment's NumPy {np.__version__} arrays: install numpy<2" in str(err.value)
    assert not server.workspace.exists() and not server.running()
