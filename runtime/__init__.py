"""The torch-free runtime: a bundle in, images out, with numpy and a backend.

- `pipeline.py`: `Pipeline`, the sampling loop (the one place that knows the engine protocol);
- `engine.py`: the engine protocol every backend implements;
- `backends/`: one folder per backend (`onnxruntime/`, `tensorrt/`);
- `families/`: what differs between pipeline families (one class per family);
- `schedulers/`: numpy schedulers, pure functions of their config;
- `tokenizer.py`: prompts to token ids.
"""
