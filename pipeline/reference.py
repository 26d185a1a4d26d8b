"""The reference data path: PIL decoding and torchvision transforms in DataLoader workers.

The same recipes as ``pipeline.augment``, built the way the original MoCo code builds
them (``main_moco.py`` with ``moco.loader.TwoCropsTransform`` and ``GaussianBlur``),
reading the same shards through webdataset. It is the ground truth of the parity
tests and the baseline of ``moco-bench pipeline`` and ``e2e``, where it must be a
fair one: every worker gets data, and the loader is started once and repeats.
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Callable, Iterator, Optional, Sequence

import torch
import webdataset as wds
from PIL import Image, ImageFilter
from torchvision import transforms as T

from . import shards
from .augment import AugmentConfig

__all__ = [
    "GaussianBlur",
    "TwoCropsTransform",
    "reference_transform",
    "worker_split",
    "reference_samples",
    "reference_loader",
]


class GaussianBlur:
    """Gaussian blur with sigma uniform in ``sigma``, as the MoCo v2 code applies it with PIL."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    """Two independent views of one image."""

    def __init__(self, base: Callable):
        self.base = base

    def __call__(self, image):
        return self.base(image), self.base(image)


def _stored_image(key: str, data: bytes) -> Optional[Image.Image]:
    """webdataset's ``"pil"`` decoding of a sample's ``.jpg`` (RGB), opened as a JPEG only: a
    shard from elsewhere never reaches a Pillow plugin that runs a program (EPS: Ghostscript)."""
    if not key.lower().endswith(".jpg"):
        return None
    with io.BytesIO(data) as stream:
        image = Image.open(stream, formats=shards.STORED_FORMATS)
        image.load()
        return image.convert("RGB")


def reference_transform(cfg: AugmentConfig) -> T.Compose:
    """torchvision's version of ``cfg``: for ``v1()``/``v2()`` exactly the reference code's lists."""
    ops: list = [T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)]
    jitter = (
        [T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p)]
        if any(cfg.jitter) and cfg.jitter_p > 0
        else []
    )
    gray = [T.RandomGrayscale(p=cfg.gray_p)] if cfg.gray_p > 0 else []
    ops += gray + jitter if cfg.gray_before_jitter else jitter + gray
    if cfg.blur_p > 0:
        ops.append(T.RandomApply([GaussianBlur(cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=cfg.flip_p))
    ops += [T.ToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(ops)


def worker_split(shards_on_rank: int, workers: int) -> str:
    """How a rank's DataLoader workers share its shards: ``"shards"`` (whole shards each) or ``"samples"``.

    Whole shards when there are at least as many as workers, as webdataset does;
    with fewer, splitting by shard would leave workers without data, so every worker
    reads the rank's shards and keeps every ``workers``-th sample.
    """
    return "shards" if shards_on_rank >= max(1, workers) else "samples"


def _split_samples_by_worker(samples: Iterator[dict]) -> Iterator[dict]:
    # Every worker reads the same shards in the same order (the shard shuffle is
    # seeded alike in each), so taking every num_workers-th sample gives disjoint shares.
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    yield from itertools.islice(samples, worker, None, num_workers)


def reference_samples(urls: Sequence[str], *, workers: int, seed: int = 0) -> wds.WebDataset:
    """The raw samples (dicts of key and file bytes) of ``urls`` as one DataLoader worker of ``workers`` reads them."""
    by_shard = worker_split(len(urls), workers) == "shards"
    dataset = wds.WebDataset(
        list(urls),
        shardshuffle=len(urls),
        seed=seed,
        nodesplitter=None,
        workersplitter=wds.split_by_worker if by_shard else None,
        empty_check=False,
    )
    if not by_shard:
        dataset = dataset.compose(_split_samples_by_worker)
    return dataset


class _InIndex:
    """Whether a sample is one its tar's index lists. A tar indexed in place (``moco-shards
    index``) also holds samples the index leaves out (a ``.webp``, a broken header); the
    reference reads what DALI reads. Holds the keys of the rank's shards (the baseline's cost)."""

    def __init__(self, pairs):
        self.keys = {
            (str(tar), members[0][3].split(".")[0])
            for tar, idx in pairs
            for members in shards.read_index(idx)
        }

    def __call__(self, sample: dict) -> bool:
        return (sample["__url__"], sample["__key__"]) in self.keys


def reference_loader(
    folder,
    cfg: AugmentConfig,
    batch_size: int,
    *,
    workers: int = 4,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    device: Optional[torch.device] = None,
    shuffle_buffer: int = 1000,
    repeat: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (view_q, view_k) float32 NCHW on ``device``, from PIL and torchvision in workers.

    This rank reads shards ``rank::world``; its workers share them by ``worker_split``.
    The DataLoader and its workers are started here, before the first batch is asked
    for; with ``repeat`` every worker loops over its share for ever (one loader for a
    whole benchmark, no restart between epochs), otherwise one epoch is yielded.
    """
    manifest, pairs = shards.discover(folder)
    urls = [str(tar) for tar, _ in pairs][rank::world]
    dataset = reference_samples(urls, workers=workers, seed=seed)
    if manifest.indexed:
        dataset = dataset.select(_InIndex(pairs[rank::world]))
    dataset = (
        dataset.shuffle(shuffle_buffer)
        .decode(_stored_image)
        .to_tuple("jpg")
        .map_tuple(TwoCropsTransform(reference_transform(cfg)))
    )
    if repeat:
        dataset = dataset.repeat()
    pin = device is not None and device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    return _to_device(iter(loader), device, pin)


def _to_device(
    batches, device: Optional[torch.device], pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for ((view_q, view_k),) in batches:
        if device is not None:
            view_q, view_k = (
                view_q.to(device, non_blocking=pin),
                view_k.to(device, non_blocking=pin),
            )
        yield view_q, view_k
