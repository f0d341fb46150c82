"""idcrafter-jax: ID-Crafter (Wan 2.1 DiT + Wan VAE + Qwen2.5-VL + HIPA, Flow-GRPO) in JAX/Flax."""
from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

setup(
    name="idcrafter-jax",
    version="0.1.0",
    description="Multi-subject identity-preserving video generation (ID-Crafter) in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["idcrafter_jax", "idcrafter_jax.*"]),
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.6",
        "array-record>=0.5",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "einops>=0.8",
        "numpy>=1.26",
        "pillow>=10.0",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "tqdm>=4.66",
        "jinja2>=3.1",
        "scenedetect>=0.6.4",
        "tensorboardX>=2.6",
        "etils>=1.5",
        "matplotlib>=3.8",
    ],
    extras_require={
        # PyTorch references for the parity tests only; the library never imports torch.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "diffusers>=0.35",
            "accelerate>=1.0",
        ],
        # libtpu at the installed jax's version: runs on TPU VMs, and lets a CPU machine
        # AOT-compile for TPU topologies (launch/dryrun.py, the Mosaic kernel tests).
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "gpu": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)
