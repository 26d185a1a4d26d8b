"""moco-dali: MoCo pretraining fed by NVIDIA DALI from WebDataset shards.

The ranges below are what people installing moco-dali into their own environment
get; ``./dev``, CI and the benchmarks install the exact versions of
``requirements.lock`` instead (``./dev upgrade`` moves them, see the README).
"""

from setuptools import setup

# The folders are the packages; installed, they live under one name, moco_dali (a
# namespace: there is no moco_dali/ folder), so installing moco-dali takes no generic
# top-level names such as "train" or "tools".
FOLDERS = [
    "common",
    "pipeline",
    "model",
    "train",
    "train/eval",
    "tools",
    "tools/shards",
    "tools/bench",
    "tools/demo",
]
PACKAGES = {"moco_dali." + folder.replace("/", "."): folder for folder in FOLDERS}

setup(
    name="moco-dali",
    version="0.1.0",
    description="MoCo self-supervised pretraining with a DALI GPU data path over WebDataset shards",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
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
        # the files the tools read (manifests, part manifests, bench records) decoded against
        # one declared schema: strict typed decoding with bounds, and the path of the field at
        # fault in its errors; small (no dependencies) and fast
        "msgspec>=0.18",
    ],
    extras_require={
        # moco-shards build --executor ray: the parts of a build as tasks on a Ray cluster,
        # an existing scheduler rather than a home-made launcher (optional: the local
        # process pool is the default executor)
        "ray": ["ray>=2.9,<3"],
        # moco-shards build over Parquet files and Hugging Face datasets' Arrow folders: the
        # reference reader of both formats, read a row group at a time (optional: no other
        # input needs it)
        "parquet": ["pyarrow>=14"],
        # shards in S3-compatible object storage (moco-shards push DIR s3://bucket/prefix): the
        # reference client, with the standard credential chain, AWS_ENDPOINT_URL endpoints
        # (MinIO, Ceph, R2), timeouts, and retries that back off on throttling (503 SlowDown)
        "s3": ["boto3>=1.34,<2"],
        "dev": [
            # the tests write Parquet and Arrow files and build shards from them
            "pyarrow>=14",
            # the tests start a local Ray instance to run a build's parts as Ray tasks
            "ray>=2.9,<3",
            "boto3>=1.34,<2",
            # a real S3 endpoint on 127.0.0.1 for the object-store tests: moto's server (it
            # needs flask and flask-cors), started by a fixture, not a mock of the client
            "moto[s3]>=5",
            "flask>=3",
            "flask-cors>=4",
            "pytest>=8",
            "pytest-timeout>=2.2",
            # runs the tests in a shuffled order (-p randomly, seeded, off by default in
            # pytest.ini): the suite must pass in any order, as from any temporary folder
            "pytest-randomly>=3.15",
            # installs and resolves requirements.lock (./dev setup, ./dev upgrade)
            "uv>=0.9",
            # checks the layout's import arrows (.importlinter, tests/test_layout.py)
            "import-linter>=2.5",
            # property-based tests of the configuration rules: any value a key can be given
            # either validates or ends in one line naming the key (tests/train/test_config.py)
            "hypothesis>=6.100",
            # formats and lints the tree (ruff.toml; tests/test_layout.py runs both checks)
            "ruff>=0.15",
        ],
    },
    entry_points={
        "console_scripts": [
            "moco-shards=moco_dali.tools.shards.cli:main",
            "moco-demo=moco_dali.tools.demo.cli:main",
            "moco-bench=moco_dali.tools.bench.cli:main",
            "moco-train=moco_dali.train.cli:main",
            "moco-eval=moco_dali.train.eval.cli:main",
        ]
    },
)
