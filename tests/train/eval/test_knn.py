"""The kNN monitor's classifier against a brute-force transcription, and the learning-rate schedules."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from moco_dali.train.eval.knn import knn_classify
from moco_dali.train.schedule import learning_rates


def brute_force(train_f, train_y, val_f, classes, k, t):
    predictions = []
    for v in val_f:
        similarity = [(float(v @ f), int(y)) for f, y in zip(train_f, train_y)]
        similarity.sort(key=lambda pair: -pair[0])
        votes = [0.0] * classes
        for s, y in similarity[:k]:
            votes[y] += math.exp(s / t)
        predictions.append(sorted(range(classes), key=lambda c: -votes[c]))
    return predictions


@pytest.mark.parametrize("k, max_elements", [(5, 2**27), (20, 300)])  # the second forces chunking
def test_knn_matches_brute_force(k, max_elements):
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(120, 8, generator=g), dim=1)
    train_y = torch.randint(0, 6, (120,), generator=g)
    val_f = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    val_y = torch.randint(0, 6, (40,), generator=g)
    result = knn_classify(train_f, train_y, val_f, val_y, classes=6, k=k, t=0.1, max_elements=max_elements)
    ranked = brute_force(train_f, train_y, val_f, 6, k, 0.1)
    top1 = 100 * np.mean([r[0] == int(y) for r, y in zip(ranked, val_y)])
    top5 = 100 * np.mean([int(y) in r[:5] for r, y in zip(ranked, val_y)])
    assert result["top1"] == pytest.approx(top1)
    if k >= 20:  # with fewer neighbours, classes without votes tie and top-5 is arbitrary among them
        assert result["top5"] == pytest.approx(top5)


def test_knn_finds_separable_classes():
    centres = F.normalize(torch.eye(4, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    features = F.normalize(centres[labels] + 0.05 * torch.randn(120, 16), dim=1)
    assert knn_classify(features, labels, features, labels, classes=4, k=10)["top1"] == 100.0


def test_schedules():
    step = learning_rates(0.1, 10, 200, "step", (120, 160))
    assert step[0] == pytest.approx(0.1) and step[1200] == pytest.approx(0.01) and step[1600] == pytest.approx(0.001)
    assert step[1199] == pytest.approx(0.1)
    cosine = learning_rates(0.1, 10, 100, "cosine")
    assert cosine[0] == pytest.approx(0.1) and cosine[500] == pytest.approx(0.05) and cosine[-1] < 1e-4
    warm = learning_rates(0.1, 10, 100, "cosine", warmup_epochs=2)
    assert warm[0] == pytest.approx(0.1 / 20) and warm[19] == pytest.approx(0.1) and warm[20] < 0.1
