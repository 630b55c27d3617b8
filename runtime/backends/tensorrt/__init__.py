"""TensorRT / TensorRT-RTX backend: `engine.py` runs a built engine on the GPU, `loop.py` keeps the
flow-matching loop on the device with the step graph of `flow_step.py`. Engines are built by `latentrt.engines`."""
