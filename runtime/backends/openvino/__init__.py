"""OpenVINO backend (CPU): `engine.py` compiles a component's ONNX with OpenVINO's CPU plugin, in bf16
where the CPU has bf16 matrix instructions and int8 from calibrated Q/DQ graphs, with compiled models
cached in the bundle (`cache.py`)."""
