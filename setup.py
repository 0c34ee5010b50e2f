from setuptools import find_packages, setup

setup(
    name="moe_fusion",
    version="0.1.0",
    description="Ascend MoE fused operators as PyTorch ops for every device, and torch.compile fusion passes",
    packages=find_packages(include=["moe_fusion", "moe_fusion.*"]),
    python_requires=">=3.10",
    # A range 2.13.0 satisfies: pip then keeps the CPU build installed first (see README). numpy:
    # torch imports it when present and warns "Failed to initialize NumPy" on every rank when not.
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "onnx": ["onnx>=1.20", "onnxscript>=0.5", "onnxruntime>=1.22"],
        "test": ["pytest>=8", "hypothesis>=6.100", "numpy", "pytest-timeout",
                 "onnx>=1.20", "onnxscript>=0.5", "onnxruntime>=1.22", "protobuf>=4.21"],
        # The MoE libraries the integration tests fuse, pinned: their graphs are what the passes read.
        "integration": ["transformers==5.25.0", "spmd_types==0.2.3", "torch_checkpointing==0.1.1", "tyro==1.0.17",
                        # deepspeed==0.19.8's (installed by .ci/setup without its dependencies)
                        "einops==0.8.2", "hjson==3.1.0", "msgpack==1.2.4", "ninja==1.13.2", "psutil==7.2.2",
                        "py-cpuinfo==9.0.0", "pydantic==2.14.4",
                        "packaging>=24.2"],   # megatron-core==0.16.1 (installed --no-deps by .ci/setup) imports it
    },
)
