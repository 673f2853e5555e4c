"""megaloop: pretraining and measurement stack for looped (depth-recurrent) language models.

`kernels/` and `analysis/` live at the top of the repository but install as
`megaloop.kernels` and `megaloop.analysis`, so they cannot clash with the unrelated
PyPI packages of the same names.
"""
from setuptools import setup

setup(
    name="megaloop",
    version="0.1.0",
    description="Pretraining and scaling-law measurement for looped language models",
    python_requires=">=3.10",
    packages=["megaloop", "megaloop.data", "megaloop.inference", "megaloop.inference.hf_modeling", "megaloop.inference.tasks", "megaloop.parallel", "megaloop.sweep", "megaloop.commands", "megaloop.kernels", "megaloop.kernels.triton", "megaloop.analysis"],
    package_dir={
        "megaloop": "megaloop",
        "megaloop.kernels": "kernels",
        "megaloop.analysis": "analysis",
    },
    # torch is deliberately unpinned here: setup.sh pins 2.13.0 on CPU machines, while a GPU
    # cluster keeps the CUDA build it already has. The floor is the newest torch API the code calls:
    # torch.nn.utils.get_total_norm and clip_grads_with_norm_ (2.6; SDPA's enable_gqa is 2.5).
    # Tested against 2.13.0 only (tests/test_setup.py keeps the floor and the calls in step).
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tqdm",
        "sentencepiece>=0.2",
        "safetensors",
        "scipy",
        "statsmodels",
        "matplotlib",
        "pandas",
    ],
    extras_require={
        "distributed": ["deepspeed>=0.15"],
        "gpu": ["triton>=3.0", "flash-attn"],
        "logging": ["tensorboard", "wandb"],
        "hf": ["transformers>=5.0"],
        "eval": ["lm-eval>=0.4.13"],
        "fp8": ["torchao==0.18.0"],  # parallel.precision: fp8 (megaloop/fp8.py); CPU tests use its emulation
        # corpus formats: parquet shards, .zst, `datasets` folders, Hugging Face tokenizer.json
        "data": ["pyarrow>=14", "zstandard>=0.22", "datasets>=3.0", "tokenizers>=0.20"],
        "dev": ["torchao==0.18.0", "pyarrow>=14", "zstandard>=0.22", "datasets>=3.0", "tokenizers>=0.20", "megatron-core>=0.16.1,<0.17", "pytest", "pytest-xdist", "triton>=3.0", "deepspeed>=0.15", "nbclient", "nbformat", "ipykernel", "tensorboard", "wandb", "transformers>=5.0", "lm-eval>=0.4.13"],
    },
    package_data={"megaloop.inference.tasks": ["*/*.yaml", "*/*.jsonl", "*/*.py", "*/*.md"],
                  "megaloop.sweep": ["templates/*.in"]},
    entry_points={"console_scripts": ["megaloop=megaloop.cli:main"]},
)
