"""The reference data path: PIL decoding and torchvision transforms in DataLoader workers.

The same recipes as ``pipeline.augment``, built the way the original MoCo code builds
them (``main_moco.py`` with ``moco.loader.TwoCropsTransform`` and ``GaussianBlur``),
reading the same shards through webdataset. It is the ground truth of the parity
tests and the baseline of ``moco-bench pipeline``.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Optional

import torch
import webdataset as wds
from PIL import ImageFilter
from torchvision import transforms as T

from moco_dali.pipeline import shards
from moco_dali.pipeline.augment import AugmentConfig

__all__ = ["GaussianBlur", "TwoCropsTransform", "reference_transform", "reference_loader"]


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


def reference_transform(cfg: AugmentConfig) -> T.Compose:
    """torchvision's version of ``cfg``: for ``v1()``/``v2()`` exactly the reference code's lists."""
    ops: list = [T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)]
    jitter = [T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p)] if any(cfg.jitter) and cfg.jitter_p > 0 \
        else []
    gray = [T.RandomGrayscale(p=cfg.gray_p)] if cfg.gray_p > 0 else []
    ops += gray + jitter if cfg.gray_before_jitter else jitter + gray
    if cfg.blur_p > 0:
        ops.append(T.RandomApply([GaussianBlur(cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=cfg.flip_p))
    ops += [T.ToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(ops)


def reference_loader(folder, cfg: AugmentConfig, batch_size: int, *, workers: int = 4, rank: int = 0,
                     world: int = 1, seed: int = 0, device: Optional[torch.device] = None,
                     shuffle_buffer: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (view_q, view_k) float32 NCHW on ``device``, from PIL and torchvision in workers."""
    _, pairs = shards.discover(folder)
    urls = [str(tar) for tar, _ in pairs]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=lambda u: list(u)[rank::world],
                       workersplitter=wds.split_by_worker, empty_check=False)
        .shuffle(shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg")
        .map_tuple(TwoCropsTransform(reference_transform(cfg)))
    )
    pin = device is not None and device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin,
                                         drop_last=True, persistent_workers=workers > 0)
    for ((view_q, view_k),) in loader:
        if device is not None:
            view_q, view_k = view_q.to(device, non_blocking=pin), view_k.to(device, non_blocking=pin)
        yield view_q, view_k
