"""Serving bundles on Triton Inference Server (KServe v2 over HTTP and gRPC, dynamic batching, metrics).

- `batch.py`: requests to images, independent of the server: checking a request's tensors against
  the bundle (`RequestParser`), grouping rows that can share a pipeline call (`run_batch`);
- `model.py`: the Triton Python-backend model around them (one pipeline per model instance);
- `repository.py`: Triton model repositories (`ModelConfig`, `write_repository`);
- `server.py`: finding tritonserver and a Python environment its stub can run latentrt in, and
  running the server (`TritonServer`).

The served model is torch-free: it imports only the runtime and the bundle format.
"""
