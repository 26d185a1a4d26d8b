"""moco-dali: MoCo pretraining fed by NVIDIA DALI from WebDataset shards.

The ranges below are what people installing moco-dali into their own environment
get; ``./dev``, CI and the benchmarks install the exact versions of
``requirements.lock`` instead (``./dev upgrade`` moves them, see the README).
"""

from setuptools import find_packages, setup

setup(
    name="moco-dali",
    version="0.1.0",
    description="MoCo self-supervised pretraining with a DALI GPU data path over WebDataset shards",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline", "pipeline.*", "model", "model.*", "train", "train.*",
                                    "tools", "tools.*"]),
    install_requires=[
        # One matched pair: torchvision's compiled operators only load beside the torch
        # release they were built against, which its own requirement pins.
        "torch>=2.9,<3",
        "torchvision>=0.24,<1",
        "nvidia-dali-cuda120>=2.0,<3",
        "webdataset>=0.2.86,<2",
        "numpy>=1.24",
        "pillow>=10",
        # libjpeg-turbo with a strict mode: rejects corrupt JPEGs that Pillow keeps
        # with grey blocks, and decodes plus encodes at about twice Pillow's speed.
        "simplejpeg>=1.7",
        "tqdm>=4.60",
        # metrics for people who watch runs in TensorBoard (moco-train writes both JSONL and events)
        "tensorboard>=2.14",
        # moco-bench --chart and the quality record's curve: PNG charts people can read
        "matplotlib>=3.7",
        # moco-train --config run.yaml
        "pyyaml>=6",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            # installs and resolves requirements.lock (./dev setup, ./dev upgrade)
            "uv>=0.9",
        ],
    },
    entry_points={"console_scripts": ["moco-shards=tools.shards_cli:main", "moco-demo=tools.demo:main",
                                    "moco-bench=tools.bench:main", "moco-train=train.cli:main",
                                    "moco-eval=train.eval_cli:main"]},
)
