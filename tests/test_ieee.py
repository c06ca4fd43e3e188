"""ieee_sqrt is correctly rounded where torch 2.13's CPU torch.sqrt is not."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mplamb.kernels._ieee import ieee_sqrt


def _values(dtype, n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(n) * 10.0 ** rng.integers(-30, 30, n)
    return torch.from_numpy(x).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ieee_sqrt_is_correctly_rounded(dtype):
    x = _values(dtype)
    expected = np.sqrt(x.numpy())  # the hardware instruction: correctly rounded
    assert np.array_equal(ieee_sqrt(x).numpy(), expected)
    # spot-check the oracle itself against Python's correctly rounded math.sqrt
    for v in x[:50].double().tolist():
        assert float(np.sqrt(np.float64(v))) == math.sqrt(v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ieee_sqrt_half(dtype):
    x = _values(torch.float32, 10_000).clamp(1e-4, 1e4).to(dtype)
    expected = torch.from_numpy(np.sqrt(x.float().numpy()).astype(np.float64)).to(dtype)
    assert torch.equal(ieee_sqrt(x), expected)


def test_shapes_and_specials():
    assert ieee_sqrt(torch.tensor(4.0)).shape == ()
    assert ieee_sqrt(torch.tensor(4.0, dtype=torch.float64)).item() == 2.0
    assert ieee_sqrt(torch.empty(0, 3, dtype=torch.float64)).shape == (0, 3)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -1.0])
    out = ieee_sqrt(specials)
    assert out[0] == 0 and math.copysign(1, out[1].item()) == -1 and out[2] == float("inf")
    assert torch.isnan(out[3]) and torch.isnan(out[4])
