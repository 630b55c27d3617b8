"""LoRA without torch: adapters read with safetensors' numpy API, merged into a bundle's weights
with numpy, swapped into the engines with `set_weights` (runtime/engine.py).

`files.py` reads a LoRA file, `formats.py` maps its keys (diffusers/PEFT, kohya, BFL Flux) onto the
bundle's parameters, `weights.py` places deltas into initializers through the manifest's weight
map (quantized weights re-quantized), `adapters.py` keeps the loaded adapters and computes the
mix, `bundle.py` writes a bundle with adapters merged for good.
"""
