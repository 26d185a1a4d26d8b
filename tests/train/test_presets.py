"""Presets hold the values their references publish."""

from __future__ import annotations

from moco_dali.train.presets import preset


def test_cifar_preset_is_the_authors_cifar10_demonstration():
    c = preset("cifar")
    m, d, o, r = c.model, c.data, c.optim, c.run
    assert (m.arch, m.small_stem, m.dim, m.mlp) == ("resnet18", True, 128, False)
    assert (m.K, m.m, m.T, m.symmetric, m.shuffle, m.num_splits) == (
        4096,
        0.99,
        0.1,
        True,
        "auto",
        8,
    )
    assert (d.preset, d.views.size, d.eval_resize, d.batch_size) == ("cifar", 32, 32, 512)
    assert o.lr_per_256 * d.batch_size / 256 == 0.06
    assert (o.name, o.momentum, o.weight_decay, o.schedule) == ("sgd", 0.9, 5e-4, "cosine")
    assert (r.epochs, r.knn_every, r.knn_k, r.knn_t) == (200, 1, 200, 0.1)
