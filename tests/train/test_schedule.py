"""The schedules a run precomputes: values at the ends and the middle, and the names refused."""

from __future__ import annotations

import pytest

from moco_dali.train.schedule import momenta


def test_momentum_is_constant_or_a_cosine_to_one():
    assert set(momenta(0.99, 1000)) == {0.99}
    cosine = momenta(0.99, 1001, "cosine")
    assert cosine[0] == pytest.approx(0.99)
    assert cosine[500] == pytest.approx(0.995, abs=1e-5)
    assert cosine[-1] == pytest.approx(1.0, abs=1e-7) and (cosine[1:] >= cosine[:-1]).all()
    with pytest.raises(ValueError, match="unknown momentum schedule"):
        momenta(0.99, 10, "linear")
