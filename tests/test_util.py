"""The sigma-frame helpers: broadcasting, sigma validation, the ODE drift, finiteness checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scorekit._util import LOG_2PI, append_dims, as_sigma, check_finite, to_d


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 3, 4), (5, 2, 3, 4)])
def test_append_dims_broadcasts_any_rank(shape):
    v = torch.arange(5.0)
    x = torch.ones(shape)
    out = append_dims(v, x.ndim)
    assert out.shape == (5,) + (1,) * (len(shape) - 1)
    prod = out * x
    for i in range(5):
        assert torch.all(prod[i] == i)


def test_append_dims_refuses_lower_rank():
    with pytest.raises(ValueError, match="rank 2 to rank 1"):
        append_dims(torch.ones(3, 2), 1)


def test_as_sigma_forms_and_dtype():
    x = torch.zeros(4, 3, dtype=torch.float64)
    for given, value in [
        (0.5, 0.5),
        (1, 1.0),
        (torch.tensor(0.5), 0.5),
        (np.float32(0.5), 0.5),
        (torch.full((4,), 0.25, dtype=torch.float32), 0.25),
    ]:
        s = as_sigma(given, x)
        assert s.shape == (4,) and s.dtype == torch.float64 and s.device == x.device
        assert torch.all(s == value)


@pytest.mark.parametrize(
    ("sigma", "exc", "match"),
    [
        (torch.ones(3), ValueError, r"sigma must be a scalar or have shape \[B\] = \[4\]"),
        (torch.ones(4, 1), ValueError, r"got shape \(4, 1\)"),
        (-0.1, ValueError, "sigma must be >= 0"),
        (torch.tensor([0.1, -1.0, 0.2, 0.3]), ValueError, "sigma must be >= 0; got min -1"),
        (float("nan"), ValueError, "sigma contains NaN"),
        ("0.5", TypeError, "sigma must be a number or a tensor, got str"),
        (True, TypeError, "sigma must be a number or a tensor, got bool"),
    ],
)
def test_as_sigma_rejects_bad_input(sigma, exc, match):
    with pytest.raises(exc, match=match):
        as_sigma(sigma, torch.zeros(4, 2))


def test_as_sigma_names_the_argument():
    with pytest.raises(ValueError, match="sigma_next must be >= 0"):
        as_sigma(-1.0, torch.zeros(2, 2), name="sigma_next")
    with pytest.raises(ValueError, match="batch dimension"):
        as_sigma(1.0, torch.tensor(1.0))


def test_to_d_is_the_pf_ode_drift():
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    d = torch.randn(3, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    out = to_d(x, sigma, d)
    for i in range(3):
        torch.testing.assert_close(out[i], (x[i] - d[i]) / sigma[i].item())


def test_check_finite_names_rows():
    t = torch.zeros(5, 2)
    assert check_finite(t, "ok") is t
    t[1, 0] = float("nan")
    t[3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"denoised is not finite .* rows \[1, 3\]"):
        check_finite(t, "denoised")


def test_log_2pi():
    assert LOG_2PI == pytest.approx(math.log(2 * math.pi), rel=1e-15)
