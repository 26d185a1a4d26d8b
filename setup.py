"""moco-dali: MoCo pretraining fed by NVIDIA DALI from WebDataset shards."""

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
        "torch",
        "torchvision",
        "nvidia-dali-cuda120",
        "webdataset",
        "numpy",
        "pillow",
        # libjpeg-turbo with a strict mode: rejects corrupt JPEGs that Pillow keeps
        # with grey blocks, and decodes plus encodes at about twice Pillow's speed.
        "simplejpeg",
        "tqdm",
        # metrics for people who watch runs in TensorBoard (moco-train writes both JSONL and events)
        "tensorboard",
        # moco-bench --chart and the quality record's curve: PNG charts people can read
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["moco-shards=tools.shards_cli:main", "moco-demo=tools.demo:main",
                                    "moco-bench=tools.bench:main", "moco-train=train.cli:main",
                                    "moco-eval=train.eval_cli:main"]},
)
