"""Starting Triton Inference Server on a bundle: the binary, the Python the model runs in, the process.

Triton runs a Python-backend model in a stub process (`triton_python_backend_stub`) that embeds
libpython and finds its environment by looking up `python3` on PATH. Two things must agree for the
model to run latentrt:

1. the libpython the stub loads and the environment's standard library: the `nvidia-pytriton`
   wheel's stub for Python 3.11 links `libpython3.11.so.1.0`, which the dynamic loader finds in the
   system (Debian: 3.11.2) even when the environment is a pyenv 3.11.7 venv; the 3.11.7 stdlib on
   the 3.11.2 runtime then fails (`'_thread.RLock' object has no attribute '_recursion_count'`).
   `python_environment` finds the environment's own shared libpython, and the server's workspace
   puts it first on the stub's library path (a folder with that one library in it);
2. NumPy: the wheel's stubs were built against NumPy 1.x and misread NumPy 2's arrays (BYTES inputs
   come out as one repeated byte and the stub dies). The environment needs `numpy<2`; the
   `serve` extra pins it through `nvidia-pytriton`, and `make install` builds such an environment in
   `.venv/serve`.

`TritonServer` writes a workspace (the model repository, a backend folder with the stub for the
environment's Python, the library folder), starts `tritonserver` in its own process group, waits
until `/v2/health/ready` answers, and stops it with SIGTERM (then SIGKILL for the group, so no stub
outlives it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from latentrt.errors import InputError, LatentRTError
from latentrt.serve.repository import ModelConfig, checked_manifest, write_model

logger = logging.getLogger(__name__)

_PROBE = r"""
import importlib.util, json, sys, sysconfig
try:
    import numpy
    np_version = numpy.__version__
except ImportError:
    np_version = None
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "prefix": sys.prefix,
    "bin": sysconfig.get_path("scripts"),
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "soname": sysconfig.get_config_var("INSTSONAME"),
    "numpy": np_version,
    "latentrt": importlib.util.find_spec("latentrt") is not None,
    "pytriton": list(spec.submodule_search_locations)[0] if spec else None,
}))
"""


@dataclass(frozen=True)
class PythonEnvironment:
    """A Python environment the Python-backend stub can run latentrt in.

    Attributes:
        prefix: the environment (sys.prefix of its interpreter).
        bin: its scripts folder, put first on the stub's PATH so the stub finds this environment.
        version: (major, minor, micro) of its interpreter.
        libpython: its shared libpython (the one the stub must load).
        numpy: its NumPy version.
        pytriton: the `pytriton` package folder when the `nvidia-pytriton` wheel is installed there.
    """

    prefix: Path
    bin: Path
    version: tuple[int, int, int]
    libpython: Path
    numpy: str
    pytriton: Path | None

    @classmethod
    def probe(cls, prefix: str | os.PathLike) -> PythonEnvironment:
        """Ask the environment's interpreter; raises InputError with the fix when it cannot serve."""
        prefix = Path(prefix)
        python = prefix / "bin" / "python"
        if not python.exists():
            raise InputError(f"{prefix} is not a Python environment (no bin/python); pass the folder of a venv")
        result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise InputError(f"{python} failed to report its set-up: {result.stderr.strip()[-500:]}")
        info = json.loads(result.stdout)
        where = f"the Python environment {info['prefix']}"
        if not info["latentrt"]:
            raise InputError(f"{where} has no latentrt: install it there (`{prefix}/bin/pip install 'latentrt[serve]'`)")
        if info["numpy"] is None or int(info["numpy"].split(".")[0]) >= 2:
            raise InputError(
                f"{where} has NumPy {info['numpy']}; Triton's Python-backend stub was built against NumPy 1.x and "
                f"misreads NumPy 2 arrays. Serve from an environment with numpy<2: `make install` builds one in "
                f".venv/serve (pass --python-env .venv/serve), or `pip install 'latentrt[serve]'` in a fresh venv"
            )
        libpython = Path(info["libdir"] or "") / (info["soname"] or "")
        if not info["soname"] or not libpython.is_file():
            raise InputError(
                f"{where} runs a Python without a shared libpython ({libpython} not found); Triton's Python-backend "
                f"stub embeds libpython{info['version'][0]}.{info['version'][1]}.so: build the environment from a "
                f"Python with a shared library (Debian's python3, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)"
            )
        return cls(
            prefix=Path(info["prefix"]),
            bin=Path(info["bin"]),
            version=tuple(info["version"]),
            libpython=libpython,
            numpy=info["numpy"],
            pytriton=Path(info["pytriton"]) if info["pytriton"] else None,
        )


def find_python_environment(python_env: str | os.PathLike | None = None) -> PythonEnvironment:
    """The environment to run the model in: `python_env`, else this interpreter's when it can serve,
    else `<this environment>/serve` (where `make install` builds one with numpy<2)."""
    if python_env is not None:
        return PythonEnvironment.probe(python_env)
    try:
        return PythonEnvironment.probe(sys.prefix)
    except InputError as err:
        nested = Path(sys.prefix) / "serve"
        if (nested / "bin" / "python").exists():
            return PythonEnvironment.probe(nested)
        raise err


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and what it needs to run a Python-backend model.

    Attributes:
        binary: the `tritonserver` executable.
        python_backend: the folder with `libtriton_python.so` and `triton_python_backend_utils.py`.
        stub: the `triton_python_backend_stub` to use (None: the one in `python_backend`).
        libraries: folders the binary's libraries are in (the wheel's `nvidia_pytriton.libs`).
    """

    binary: Path
    python_backend: Path
    stub: Path | None = None
    libraries: tuple[Path, ...] = ()

    @classmethod
    def from_pytriton(cls, package: Path, python: tuple[int, ...]) -> TritonInstall:
        """The server inside the `nvidia-pytriton` wheel, with the stub built for `python` (major, minor)."""
        dist = package / "tritonserver"
        version = f"{python[0]}.{python[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir()) if (dist / "python_backend_stubs").is_dir() else []
            raise InputError(f"the nvidia-pytriton wheel in {package} has no Python-backend stub for Python {version} (it has {have}); use one of those Pythons")
        return cls(binary=dist / "bin" / "tritonserver", python_backend=dist / "backends" / "python", stub=stub, libraries=(package.parent / "nvidia_pytriton.libs",))

    @classmethod
    def from_binary(cls, binary: str | os.PathLike) -> TritonInstall:
        """A tritonserver installation (NVIDIA's container: /opt/tritonserver/bin/tritonserver)."""
        binary = Path(binary)
        if binary.is_dir():
            binary = binary / "bin" / "tritonserver"
        backend = binary.resolve().parent.parent / "backends" / "python"
        if not binary.is_file() or not (backend / "libtriton_python.so").is_file():
            raise InputError(f"{binary} is not a tritonserver installation with the Python backend (expected {backend}/libtriton_python.so)")
        return cls(binary=binary, python_backend=backend)


def find_tritonserver(env: PythonEnvironment, tritonserver: str | os.PathLike | None = None) -> TritonInstall:
    """`tritonserver` if given, else the `nvidia-pytriton` wheel in `env` or in this interpreter,
    else /opt/tritonserver, else `tritonserver` on PATH."""
    if tritonserver is not None:
        return TritonInstall.from_binary(tritonserver)
    packages = [env.pytriton]
    with contextlib.suppress(ImportError, ValueError):
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
        packages.append(Path(next(iter(spec.submodule_search_locations))) if spec else None)
    for package in packages:
        if package is not None and (package / "tritonserver" / "bin" / "tritonserver").is_file():
            return TritonInstall.from_pytriton(package, env.version)
    for candidate in (Path("/opt/tritonserver/bin/tritonserver"), shutil.which("tritonserver")):
        if candidate and Path(candidate).is_file():
            return TritonInstall.from_binary(candidate)
    raise InputError(
        "no tritonserver found: install the nvidia-pytriton wheel (`pip install 'latentrt[serve]'`), "
        "run in NVIDIA's tritonserver container, or pass --tritonserver PATH"
    )


@dataclass(frozen=True)
class ServerConfig:
    """Where and how tritonserver listens.

    Attributes:
        host: the address the HTTP, gRPC and metrics endpoints bind to ("0.0.0.0": every interface).
        http_port, grpc_port, metrics_port: their ports.
        startup_timeout_s: how long to wait for the model to load and the server to be ready.
        exit_timeout_s: how long tritonserver lets in-flight requests finish after SIGTERM.
        log_info: pass Triton's info log through (warnings and errors always are).
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 30
    log_info: bool = False

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise InputError(f"HTTP, gRPC and metrics ports must be three different ports in 1-65535, got {ports}")

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.client_host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.client_host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.client_host)}:{self.metrics_port}/metrics"


class TritonServer:
    """A tritonserver process serving a model repository; a context manager.

    Example:
        >>> with TritonServer.for_bundle("out/demo-bundle") as server:  # doctest: +SKIP
        ...     print(server.config.http_url)
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        config: ServerConfig = ServerConfig(),
        *,
        python_env: str | os.PathLike | PythonEnvironment | None = None,
        tritonserver: str | os.PathLike | None = None,
        workspace: str | os.PathLike | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.config = config
        self.env = python_env if isinstance(python_env, PythonEnvironment) else find_python_environment(python_env)
        self.install = find_tritonserver(self.env, tritonserver)
        self._own_workspace = workspace is None
        self.workspace = Path(tempfile.mkdtemp(prefix="latentrt-triton-")) if workspace is None else Path(workspace)
        self.log_path = self.workspace / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.max_batch_size: int | None = None  # known when built by `for_bundle`

    @classmethod
    def for_bundle(
        cls,
        bundle: str | os.PathLike,
        model: ModelConfig = ModelConfig(),
        config: ServerConfig = ServerConfig(),
        *,
        python_env: str | os.PathLike | PythonEnvironment | None = None,
        tritonserver: str | os.PathLike | None = None,
    ) -> TritonServer:
        """A server for one bundle, loaded in place from a repository in the server's workspace."""
        env = python_env if isinstance(python_env, PythonEnvironment) else find_python_environment(python_env)
        workspace = Path(tempfile.mkdtemp(prefix="latentrt-serve-"))
        try:
            manifest = checked_manifest(bundle, model)
            write_model(workspace / "repository", bundle, model, manifest=manifest)
            server = cls(workspace / "repository", config, python_env=env, tritonserver=tritonserver, workspace=workspace)
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise
        server._own_workspace = True
        server.max_batch_size = model.batch_size(manifest)
        return server

    def command(self) -> list[str]:
        c = self.config
        return [
            str(self.install.binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={self.workspace / 'backends'}",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            f"--log-info={str(c.log_info).lower()}",
            "--strict-readiness=true",
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, with the environment's bin first on PATH (the stub
        finds its Python there) and its libpython, then the server's libraries, first on the library path."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.env.bin), env.get("PATH", "")])
        libraries = [str(self.workspace / "lib"), *(str(p) for p in self.install.libraries), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        for name in ("PYTHONHOME", "PYTHONPATH"):  # they would point the stub at another environment
            env.pop(name, None)
        return env

    def _prepare(self) -> None:
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for item in self.install.python_backend.iterdir():
            if item.name == "triton_python_backend_stub" and self.install.stub is not None:
                continue
            _symlink(item, backend / item.name)
        if self.install.stub is not None:
            _symlink(self.install.stub, backend / "triton_python_backend_stub")
        lib = self.workspace / "lib"
        lib.mkdir(exist_ok=True)
        _symlink(self.env.libpython, lib / self.env.libpython.name)

    def start(self) -> TritonServer:
        """Start tritonserver and wait until the model is ready; raises LatentRTError with the log's tail."""
        c = self.config
        for name, port in (("HTTP", c.http_port), ("gRPC", c.grpc_port), ("metrics", c.metrics_port)):
            if not port_free(c.host, port):
                raise InputError(f"the {name} port {port} on {c.host} is in use; pick another (--{name.lower()}-port)")
        self._prepare()
        logger.info("starting %s", " ".join(self.command()))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), cwd=self.workspace, start_new_session=True, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + c.startup_timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                tail = self.log_tail()
                self._cleanup()
                raise LatentRTError(f"tritonserver exited with code {self.process.returncode} while starting:\n{tail}")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise LatentRTError(f"tritonserver was not ready after {c.startup_timeout_s:g} s:\n{tail}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        """Whether /v2/health/ready answers 200 (every model loaded)."""
        try:
            with urllib.request.urlopen(f"{self.config.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait for the in-flight requests and the models to unload, then make sure no process
        of the server's group is left; returns tritonserver's exit code."""
        if self.process is None:
            self._cleanup()
            return None
        timeout = self.config.exit_timeout_s + 15 if timeout is None else timeout
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s; killing it", timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs left behind, if any
        code = self.process.wait()
        self._cleanup()
        return code

    def log_tail(self, lines: int = 30) -> str:
        """The log's errors (Triton's `E...` lines and `error:` lines), else its last `lines` lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        noise = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")  # a CPU-only machine's usual complaints
        errors = [line for line in text if (line.startswith("E") or line.startswith("error:")) and not any(n in line for n in noise)]
        return "\n".join((errors or text)[-lines:])

    def _cleanup(self) -> None:
        if self._own_workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux), so a killed
    `latentrt serve` does not leave tritonserver running."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
