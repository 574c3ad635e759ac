"""Parallel sampling by Picard iterations over a sampler's calls (``samplers.parallel``).

``parallel_sample`` is checked against the sequential samplers of ``REGISTRY`` (separate code, run
here on the same start): equal to rounding with ``tol = 0``, within the tolerance and in far fewer
sequential rounds with ``tol = 1e-3``; stochastic ones run with the same seed or the same noise
drawn here in advance (``PresetNoise``). ``linear_step_map`` is checked against Euler's and Euler
ancestral's unrolled maps written here in closed form. Rounds and evaluations are counted by the test's own denoiser.
"""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import target
from scorekit.samplers import REGISTRY, nfe
from scorekit.samplers.common import PresetNoise
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
    for name in ("adaptive_sde", "adaptive_ode"):
        with pytest.raises(ValueError, match=f"sampler '{name}' is adaptive"):
            parallel_sample(g, x, sig, sampler=name)
    with pytest.raises(ValueError, match=r"'euler_ancestral' is stochastic.*with_noise=True"):
        linear_step_map("euler_ancestral", sig)

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


#: stochastic samplers whose points are affine in start, outputs and draws: (name, options)
NOISY = [
    ("euler_ancestral", {}),
    ("dpmpp_2m_sde", {}),
    ("sa_solver", {}),
    ("edm_stochastic", {"s_churn": 10.0}),
]


@pytest.mark.parametrize(("name", "opts"), NOISY, ids=[n for n, _ in NOISY])
def test_stochastic_samplers_with_the_same_noise(name, opts):
    # ParaDiGMS's rule: draw each step's noise up front; Picard iteration then converges to the
    # sequential sampler run with the same noise (same seed, or the same draws given in advance).
    g = Counting(target("ring8"))
    x, sig = _start(), karras(12, 0.002, 80.0)
    seq = REGISTRY[name](
        target("ring8"), x, sig, generator=torch.Generator().manual_seed(5), **opts
    )
    st: dict = {}
    got = parallel_sample(g, x, sig, sampler=name, tol=0.0, stats=st,
                          generator=torch.Generator().manual_seed(5), **opts)  # fmt: skip
    torch.testing.assert_close(got, seq, rtol=0, atol=1e-12)
    assert st["draws"] > 0 and st["rounds"] == g.calls <= st["steps"] == nfe(name, sig, **opts)
    # the noise drawn here, handed to both
    z = torch.randn(
        st["draws"], *x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype
    )
    seq_z = REGISTRY[name](target("ring8"), x, sig, generator=PresetNoise(z), **opts)
    got_z = parallel_sample(g, x, sig, sampler=name, tol=0.0, generator=PresetNoise(z), **opts)
    torch.testing.assert_close(got_z, seq_z, rtol=0, atol=1e-12)
    assert (seq_z - seq).abs().max() > 1e-2  # the noise matters
    g.calls = 0
    near = parallel_sample(g, x, sig, sampler=name, tol=1e-3, stats=st, generator=PresetNoise(z),
                           **opts)  # fmt: skip
    assert (near - seq_z).abs().max() < 1e-3
    assert st["rounds"] == g.calls < st["steps"], st
    if name == "euler_ancestral":  # one generator per row: row i depends on generator i alone
        gens = [torch.Generator().manual_seed(20 + i) for i in range(8)]
        seq_r = REGISTRY[name](target("ring8"), x, sig, generator=gens, **opts)
        gens = [torch.Generator().manual_seed(20 + i) for i in range(8)]
        got_r = parallel_sample(g, x, sig, sampler=name, tol=0.0, generator=gens, **opts)
        torch.testing.assert_close(got_r, seq_r, rtol=0, atol=1e-12)
        one = parallel_sample(g, x[5:6], sig, sampler=name, tol=0.0,
                              generator=[torch.Generator().manual_seed(25)], **opts)  # fmt: skip
        torch.testing.assert_close(one[0], seq_r[5], rtol=0, atol=1e-12)


def test_linear_step_map_of_euler_ancestral_is_its_unrolled_recursion():
    # x_{i+1} = (d_i / s_i) x_i + (1 - d_i / s_i) D_i + u_i z_i with u_i = s_{i+1} sqrt(1 - (s_{i+1}/s_i)^2)
    # and d_i = sqrt(s_{i+1}^2 - u_i^2) (Ho et al. 2020's ancestral step in the sigma frame), and the
    # last step x = D.
    sig = karras(5, 0.05, 10.0).tolist()
    alpha, beta, gamma, levels = linear_step_map(
        "euler_ancestral", torch.tensor(sig, dtype=torch.float64), with_noise=True
    )
    n = len(sig) - 1
    up = [sig[i + 1] * math.sqrt(1 - (sig[i + 1] / sig[i]) ** 2) for i in range(n - 1)]
    keep = [math.sqrt(sig[i + 1] ** 2 - up[i] ** 2) / sig[i] for i in range(n - 1)]
    assert gamma.shape == (n + 1, n - 1) and levels == pytest.approx(sig[:-1], rel=1e-15)
    for i in range(n):  # the state at sigma_i
        for k in range(n - 1):
            want = up[k] * math.prod(keep[k + 1 : i]) if k < i else 0.0
            assert gamma[i, k].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert alpha[i].item() == pytest.approx(math.prod(keep[:i]), rel=1e-12)
    assert gamma[n].abs().max() == 0 and alpha[n] == 0 and beta[n, n - 1] == 1


def test_preset_noise_errors():
    x, sig = _start(), karras(6, 0.05, 80.0)
    with pytest.raises(ValueError, match="asked for draw 3; only 2 were given"):
        REGISTRY["euler_ancestral"](
            target("ring8"), x, sig, generator=PresetNoise(torch.zeros(2, 8, 2))
        )
    with pytest.raises(ValueError, match=r"draw 0 has shape \(8, 3\)"):
        REGISTRY["euler_ancestral"](
            target("ring8"), x, sig, generator=PresetNoise(torch.zeros(9, 8, 3))
        )
    # a PresetNoise is used up by one run: a second run with it is refused, not silently shifted
    used = PresetNoise(torch.randn(10, 8, 2, generator=torch.Generator().manual_seed(0)))
    REGISTRY["euler_ancestral"](target("ring8"), x, sig, generator=used)
    with pytest.raises(ValueError, match=r"generator: this PresetNoise has handed out 5 draws"):
        parallel_sample(target("ring8"), x, sig, sampler="euler_ancestral", generator=used)


def test_custom_sampler_without_generator_keyword_is_named():
    def mine(denoiser, x, sigmas, *, callback=None):
        return x

    with pytest.raises(TypeError, match=r"sampler mine: needs a generator= keyword"):
        linear_step_map(mine, karras(4, 0.05, 80.0).double())
