"""A plain PyTorch MoCo of the ``cifar`` recipe: the reference moco-dali's engine is held to.

Independent of the project's code: it reads the same shard tars with ``tarfile`` and
then uses torchvision transforms on PIL images, a DataLoader, Algorithm 1 of He et al.
(2019) as written (keys without gradients, a per-parameter momentum loop after the
SGD step, the queue as a (dim, K) tensor updated by slicing), the symmetric loss and
split BN with the keys' batch shuffled on one device, as the authors' CIFAR-10
demonstration. Each epoch ends with weighted kNN (k 200, T 0.1) on the pooled
backbone features, the protocol of moco-dali's monitor.

    python -m benchmarks.studies.plain_moco --train SHARDS --val SHARDS --epochs 5 --out RESULT.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import time
from functools import partial
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_shards(folder: Path) -> tuple[list[Image.Image], list[int]]:
    """Every stored image and its class, in manifest order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["tar"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            images.append(Image.open(io.BytesIO(files[name])).convert("RGB"))
            labels.append(int(files[name[:-4] + ".cls"]))
    return images, labels


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


class SplitBN(nn.BatchNorm2d):
    """BN over ``splits`` sub-batches in training: the sub-batches become extra channels of one batch."""

    def __init__(self, channels, splits=8):
        super().__init__(channels)
        self.splits = splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        mean, var = self.running_mean.repeat(self.splits), self.running_var.repeat(self.splits)
        y = F.batch_norm(
            x.reshape(n // self.splits, c * self.splits, h, w),
            mean,
            var,
            self.weight.repeat(self.splits),
            self.bias.repeat(self.splits),
            True,
            self.momentum,
            self.eps,
        )
        self.running_mean.copy_(mean.view(self.splits, c).mean(0))
        self.running_var.copy_(var.view(self.splits, c).mean(0))
        return y.view(n, c, h, w)


def encoder(dim: int, small_stem: bool = True) -> nn.Module:
    net = torchvision.models.resnet18(num_classes=dim, norm_layer=partial(SplitBN, splits=8))
    if small_stem:  # 32 px images: no 7x7/2 stem, no max-pool
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


@torch.no_grad()
def knn(net, train_loader, val_loader, classes, k=200, t=0.1) -> float:
    """Weighted kNN top-1 (%) on l2-normalised pooled backbone features."""
    fc, net.fc = net.fc, nn.Identity()
    net.eval()
    try:
        feats = [
            torch.cat([F.normalize(net(x), dim=1) for x, _ in loader])
            for loader in (train_loader, val_loader)
        ]
        labels = [torch.cat([y for _, y in loader]) for loader in (train_loader, val_loader)]
    finally:
        net.fc = fc
        net.train()
    correct = 0
    for start in range(0, len(feats[1]), 1024):
        sim = feats[1][start : start + 1024] @ feats[0].t()
        weight, index = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, labels[0][index], (weight / t).exp())
        correct += (votes.argmax(1) == labels[1][start : start + 1024]).sum().item()
    return 100.0 * correct / len(feats[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--m", type=float, default=0.99)
    parser.add_argument("--T", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stem",
        choices=["small", "standard"],
        default="small",
        help="standard: torchvision's 7x7/2 stem and max-pool (about 16x less compute at 32 px)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    train_images, train_labels = read_shards(args.train)
    val_images, val_labels = read_shards(args.val)
    classes = max(train_labels) + 1
    augment = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    plain = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    pairs = torch.utils.data.DataLoader(
        TwoViews(train_images, augment),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    def eval_loader(images, labels):
        data = [(plain(im), y) for im, y in zip(images, labels)]
        return torch.utils.data.DataLoader(data, batch_size=256)

    bank, val = eval_loader(train_images, train_labels), eval_loader(val_images, val_labels)

    f_q = encoder(128, args.stem == "small")
    f_k = encoder(128, args.stem == "small")
    f_k.load_state_dict(f_q.state_dict())  # f_k.params = f_q.params
    for p in f_k.parameters():
        p.requires_grad = False
    queue = F.normalize(torch.randn(128, args.K), dim=0)
    pointer = 0
    optimizer = torch.optim.SGD(f_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    total = len(pairs) * args.epochs

    def keys(x):  # shuffled through the key encoder, so BN statistics cannot tell the positive
        order = torch.randperm(len(x))
        return F.normalize(f_k(x[order]), dim=1)[torch.argsort(order)]

    def loss_of(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / args.T
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)), logits

    history = [{"epoch": 0, "knn_top1": knn(f_q, bank, val, classes)}]
    print(json.dumps(history[-1]), flush=True)
    step, started = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        trained, correct, seen = 0.0, 0, 0
        epoch_start = time.perf_counter()
        for x1, x2 in pairs:
            for group in optimizer.param_groups:  # cosine over the whole run, per step
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            q1, q2 = F.normalize(f_q(x1), dim=1), F.normalize(f_q(x2), dim=1)
            with torch.no_grad():
                k1, k2 = keys(x1), keys(x2)
            loss_12, logits = loss_of(q1, k2)
            loss_21, _ = loss_of(q2, k1)
            loss = (loss_12 + loss_21) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_k, p_q in zip(f_k.parameters(), f_q.parameters()):
                    p_k.mul_(args.m).add_(p_q, alpha=1 - args.m)
                k = torch.cat([k1, k2])
                assert args.K % len(k) == 0
                queue[:, pointer : pointer + len(k)] = k.t()
                pointer = (pointer + len(k)) % args.K
            step += 1
            correct += (logits.argmax(1) == 0).sum().item()
            seen += len(x1)
        trained = time.perf_counter() - epoch_start
        history.append(
            {
                "epoch": epoch,
                "loss": loss.item(),
                "pretext_top1": 100.0 * correct / seen,
                "images_per_s": seen / trained,
                "knn_top1": knn(f_q, bank, val, classes),
            }
        )
        print(json.dumps(history[-1]), flush=True)
    record = {
        "implementation": "benchmarks/studies/plain_moco.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_samples": len(train_images),
        "val_samples": len(val_images),
        "steps": step,
        "seconds": time.perf_counter() - started,
        "history": history,
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
