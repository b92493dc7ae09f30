"""The noise schedule and DDIM step: pure math, checked on numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffinspect import DiffinspectError
from diffinspect.models.schedule import (
    NoiseSchedule,
    ddim_step,
    ddim_timesteps,
    q_sample,
    x0_from_eps,
)


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (4, 3, 8, 8))
    eps = rng.standard_normal((4, 3, 8, 8))
    ab = NoiseSchedule().ab(np.array([0, 100, 500, 999]))[:, None, None, None]
    return x0, eps, ab


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decreases_inside_unit_interval(kind: str) -> None:
    ab = NoiseSchedule(kind, 1000).alphas_cumprod
    assert ab.dtype == np.float64 and ab.shape == (1000,)
    assert np.all(np.diff(ab) < 0)
    assert ab[-1] > 0 and ab[0] < 1


def test_ab_lookup_and_unknown_kind() -> None:
    s = NoiseSchedule("cosine", 500)
    assert isinstance(s.ab(10), float) and s.ab(10) == s.alphas_cumprod[10]
    np.testing.assert_array_equal(s.ab(np.array([1, 2])), s.alphas_cumprod[[1, 2]])
    assert torch.allclose(s.ab(torch.tensor([1, 2])), torch.from_numpy(s.alphas_cumprod[[1, 2]]))
    with pytest.raises(DiffinspectError, match="linear, cosine"):
        NoiseSchedule("sigmoid")


def test_x0_from_eps_undoes_the_noise(arrays) -> None:
    x0, eps, ab = arrays
    xt = q_sample(x0, eps, ab)
    np.testing.assert_allclose(x0_from_eps(xt, eps, ab), x0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_with_true_eps_recovers_x0(arrays, steps: int) -> None:
    x0, eps, _ = arrays
    s = NoiseSchedule()
    path = s.ddim_alphas(400, steps)
    assert [t for t, _, _ in path] == ddim_timesteps(400, steps) and path[-1][2] == 1.0
    xt = q_sample(x0, eps, path[0][1])
    for _, ab, ab_prev in path:
        xt = ddim_step(xt, eps, ab, ab_prev)
    np.testing.assert_allclose(xt, x0, atol=1e-9)


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(250, 1) == [250]
    assert ddim_timesteps(400, 4) == [400, 300, 200, 100]
    for t_start, steps in [(999, 3), (7, 7), (100, 6)]:
        ts = ddim_timesteps(t_start, steps)
        assert len(ts) == steps and ts[0] == t_start and ts[-1] > 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(DiffinspectError, match="too small"):
        ddim_timesteps(2, 4)


def test_numpy_and_torch_agree(arrays) -> None:
    x0, eps, ab = arrays
    tx0, teps, tab = (torch.from_numpy(a) for a in (x0, eps, ab))
    xt = q_sample(x0, eps, ab)
    txt = q_sample(tx0, teps, tab)
    np.testing.assert_allclose(txt.numpy(), xt)
    np.testing.assert_allclose(x0_from_eps(txt, teps, tab).numpy(), x0_from_eps(xt, eps, ab))
    step_np = ddim_step(xt, eps, ab, 0.9)
    np.testing.assert_allclose(ddim_step(txt, teps, tab, 0.9).numpy(), step_np)
    # float32 tensors with a float ᾱ, as the scoring graph uses them
    step32 = ddim_step(txt.float(), teps.float(), 0.5, 0.9)
    np.testing.assert_allclose(step32.numpy(), ddim_step(xt, eps, 0.5, 0.9), atol=1e-5)
