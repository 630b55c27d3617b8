"""`latentrt serve BUNDLE`: Triton Inference Server with the bundle's pipeline behind it."""

from __future__ import annotations

import signal
import threading

import click

from latentrt.errors import LatentRTError


@click.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--model-name", default="latentrt", show_default=True, help="The model's name in URLs (/v2/models/NAME/infer).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--max-batch", type=int, default=None, help="Most images per batch (default: what one pipeline call takes with guidance).")
@click.option("--max-queue-delay-ms", type=float, default=5.0, show_default=True, help="How long the batcher may hold a request.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances, each its own process and pipeline.")
@click.option("--threads", type=int, default=0, show_default=True, help="ONNX Runtime threads per instance (0: all cores).")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Most denoising steps a request may ask for.")
@click.option("--max-prompt-bytes", type=int, default=4096, show_default=True, help="Longest prompt accepted (UTF-8 bytes).")
@click.option("--python-env", type=click.Path(), default=None,
              help="The venv the model runs in (needs latentrt and numpy<2; default: this one, else .venv/serve beside it).")
@click.option("--tritonserver", type=click.Path(), default=None, help="A tritonserver binary or installation folder (default: the nvidia-pytriton wheel's).")
@click.option("--startup-timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the model to load.")
@click.option("--log-info", is_flag=True, help="Show Triton's info log (warnings and errors are always shown in the log file).")
def command(bundle, backend, model_name, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_ms, instances,
            threads, max_steps, max_prompt_bytes, python_env, tritonserver, startup_timeout, log_info) -> None:
    """Serve BUNDLE over KServe v2 (HTTP, gRPC) with Triton's dynamic batching and Prometheus metrics,
    until SIGTERM or Ctrl-C."""
    from latentrt.serve.repository import ModelConfig
    from latentrt.serve.server import ServerConfig, TritonServer

    model = ModelConfig(
        name=model_name, backend=backend, max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, instances=instances,
        threads=threads, max_steps=max_steps, max_prompt_bytes=max_prompt_bytes,
    )
    config = ServerConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          startup_timeout_s=startup_timeout, log_info=log_info)
    server = TritonServer.for_bundle(bundle, model, config, python_env=python_env, tritonserver=tritonserver)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        click.echo(
            f"serving {bundle} as model '{model_name}' ({backend}, up to {server.max_batch_size} images "
            f"per batch): HTTP {config.http_url}, gRPC {config.grpc_url}, metrics {config.metrics_url}; "
            f"log {server.log_path}"
        )
        while not stop.is_set() and server.running():
            stop.wait(0.5)
        if not stop.is_set():
            raise LatentRTError(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}")
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo("stopped")

