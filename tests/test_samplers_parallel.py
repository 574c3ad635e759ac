"""Parallel sampling by Picard iterations over a sampler's calls (``samplers.parallel``).

``parallel_sample`` is checked against the sequential samplers of ``REGISTRY`` (separate code, run
here on the same start): equal to rounding with ``tol = 0``, within the tolerance and in far fewer
sequential rounds with ``tol = 1e-3``. ``linear_step_map`` is checked against Euler's unrolled map
written here in closed form. Rounds and evaluations are counted by the test's own denoiser.
"""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import target
from scorekit.samplers import REGISTRY, nfe
from scorekit.samplers.parallel import linear_step_map, parallel_sample
from scorekit.schedules import karras

#: deterministic samplers with a fixed affine step map: (name, options)
LINEAR = [
    ("euler", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("unipc", {"order": 3}),
    ("deis", {"order": 3}),
    ("ipndm", {}),
    ("dc_solver", {"ratios": [1.0, 1.0, 1.2, 0.9, 1.1, 0.8, 1.05, 1.0, 0.95, 1.1, 1.0, 1.0]}),
]


class Counting:
    def __init__(self, inner):
        self.inner, self.calls, self.rows = inner, 0, 0

    def __call__(self, x, sigma):
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return self.inner(x, sigma)


def _start(rows=8, seed=0):
    return 80.0 * torch.randn(
        rows, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize(("name", "opts"), LINEAR, ids=[n for n, _ in LINEAR])
def test_without_tolerance_it_is_the_sequential_sampler(name, opts):
    g = Counting(target("ring8"))
    x, sig = _start(), karras(12, 0.002, 80.0)
    want = REGISTRY[name](target("ring8"), x, sig, **opts)
    st: dict = {}
    got = parallel_sample(g, x, sig, sampler=name, tol=0.0, stats=st, **opts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert st["steps"] == nfe(name, sig, **opts)
    assert st["rounds"] == g.calls <= st["steps"] and st["evaluations"] * 8 == g.rows


@pytest.mark.parametrize(("name", "opts"), LINEAR[:5], ids=[n for n, _ in LINEAR[:5]])
def test_within_tolerance_in_fewer_rounds(name, opts):
    g = Counting(target("ring8"))
    x, sig = _start(16), karras(50, 0.002, 80.0)
    want = REGISTRY[name](target("ring8"), x, sig, **opts)
    for window in (None, 16):
        g.calls = g.rows = 0
        st: dict = {}
        got = parallel_sample(g, x, sig, sampler=name, tol=1e-3, window=window, stats=st, **opts)
        assert (got - want).abs().max() < 1e-3
        assert st["rounds"] == g.calls < st["steps"] / 2, (
            st
        )  # measured 14-17 rounds for 50-99 calls
        assert st["evaluations"] * 16 == g.rows and st["evaluations"] > st["steps"]
    # batch independence and determinism: exact with tol = 0, within the tolerance otherwise
    full = parallel_sample(g, x, sig, sampler=name, tol=0.0, **opts)
    one = parallel_sample(g, x[3:4], sig, sampler=name, tol=0.0, **opts)
    torch.testing.assert_close(one[0], full[3], rtol=0, atol=1e-12)
    a = parallel_sample(g, x, sig, sampler=name, tol=1e-3, **opts)
    assert torch.equal(a, parallel_sample(g, x, sig, sampler=name, tol=1e-3, **opts))


def test_linear_step_map_of_euler_is_its_unrolled_recursion():
    sig = karras(6, 0.05, 10.0).tolist()
    alpha, beta, levels = linear_step_map("euler", torch.tensor(sig, dtype=torch.float64))
    n = len(sig) - 1
    assert levels == pytest.approx(sig[:-1], rel=1e-15)
    # x_{i+1} = (s_{i+1}/s_i) x_i + (1 - s_{i+1}/s_i) D_i, unrolled:
    for i in range(n + 1):
        assert alpha[i].item() == pytest.approx(sig[i] / sig[0], rel=1e-12, abs=1e-15)
        for j in range(n):
            carry = math.prod(sig[k + 1] / sig[k] for k in range(j + 1, i))  # 1 when j + 1 = i
            want = carry * (1 - sig[j + 1] / sig[j]) if j < i else 0.0
            assert beta[i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_bad_input_is_refused():
    g, x, sig = target("ring8"), _start(), karras(6, 0.05, 80.0)
    for name in ("euler_ancestral", "adaptive_ode"):
        with pytest.raises(ValueError, match="stochastic or adaptive"):
            parallel_sample(g, x, sig, sampler=name)

    def squares(denoiser, x, sigmas, **_):  # not affine in the denoiser's outputs
        for s0 in sigmas[:-1].tolist():
            x = denoiser(x, x.new_full((x.shape[0],), s0)) ** 2
        return x

    with pytest.raises(ValueError, match="not a fixed affine map"):
        parallel_sample(g, x, sig, sampler=squares)
    with pytest.raises(ValueError, match="tol"):
        parallel_sample(g, x, sig, tol=-1.0)
    with pytest.raises(ValueError, match="window"):
        parallel_sample(g, x, sig, window=0)
    with pytest.raises(ValueError, match=r"statistics= .* differ per coordinate"):
        parallel_sample(g, x, sig, sampler="dpm_solver_v3", statistics=object())
