"""Packaging for graphmoe_fused.

The top-level ``kernels/`` folder installs as ``graphmoe_fused.kernels``: PyPI already has a
package called ``kernels``, so it must never become a top-level module.
"""

from setuptools import setup

setup(
    name="graphmoe_fused",
    version="0.1.0",
    description="Fused Triton kernels for GraphMoE (recurrent LoRA mixture-of-experts) layers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["graphmoe_fused", "graphmoe_fused.kernels"],
    package_dir={"graphmoe_fused": "graphmoe_fused", "graphmoe_fused.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10",
        "transformers>=5.17,<5.25",
        "einops>=0.8",
        "tqdm",
        "safetensors>=0.4",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "ruff"]},
    entry_points={"console_scripts": ["graphmoe-demo=graphmoe_fused.cli:main"]},
)
