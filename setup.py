"""Packaging for graphmoe_fused.

The top-level ``kernels/`` folder installs as ``graphmoe_fused.kernels``: PyPI already has a
package called ``kernels``, so it must never become a top-level module.
"""

from setuptools import find_packages, setup

PACKAGES = ["graphmoe_fused", *(f"graphmoe_fused.{p}" for p in find_packages("graphmoe_fused"))]
KERNEL_PACKAGES = ["graphmoe_fused.kernels",
                   *(f"graphmoe_fused.kernels.{p}" for p in find_packages("kernels"))]

setup(
    name="graphmoe_fused",
    version="0.1.0",
    description="Fused Triton kernels for GraphMoE (recurrent LoRA mixture-of-experts) layers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES + KERNEL_PACKAGES,
    package_dir={"graphmoe_fused": "graphmoe_fused", "graphmoe_fused.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.14",
        # Triton publishes Linux wheels only; elsewhere the torch backend runs without it.
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "transformers>=5.17,<5.25",
        "einops>=0.8",
        "tqdm",
        "safetensors>=0.4",
    ],
    extras_require={
        # `graphmoe-fused train` runs on accelerate (one process, or DDP/FSDP2 under
        # `accelerate launch`); HF Trainer needs it too. The layer alone does not.
        "train": ["accelerate>=1.0"],
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.13",
                 "accelerate>=1.0", "matplotlib>=3.7", "ruff"],
    },
    entry_points={"console_scripts": ["graphmoe-fused=graphmoe_fused.cli.app:main",
                                      "graphmoe-demo=graphmoe_fused.cli.main:main"]},
)
