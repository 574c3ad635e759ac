"""Losses: each weighting equals the plain MSE of its parameterisation's own output (computed here from
the papers' formulas, not from scorekit's scalings) for the process pairings the docs list and only
those, flow matching equals DSM with the flow weighting, and the loss is minimised by the exact
posterior mean."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.denoiser import (
    PARAMETERIZATIONS,
    EDMPrecond,
    EpsPred,
    FlowPred,
    NetDenoiser,
    VPred,
    X0Pred,
    get_parameterization,
)
from scorekit.process import PROCESSES, RectifiedFlow, VPLinear, get_process
from scorekit.train import (
    WEIGHTINGS,
    default_weighting,
    denoising_loss,
    drop_labels,
    flow_matching_loss,
    get_weighting,
)
from test_denoiser import DISCRETE, REFERENCE, _oracle_target  # each paper's alpha, s and targets


@pytest.fixture(autouse=True)
def _float64():
    # float64 so the identities below hold to 1e-9; restored so other test files are unaffected.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class TinyNet(torch.nn.Module):
    """A fixed random raw network F(x_in, c_noise) with nonlinear dependence on both inputs."""

    def __init__(self, d=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.v = torch.randn(d, generator=g, dtype=torch.float64)

    def forward(self, x, c_noise, class_labels=None):
        return torch.tanh(x @ self.w) + torch.sin(c_noise)[:, None] * self.v


def _batch(n=64, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g)
    noise = torch.randn(n, d, generator=g)
    return x0, noise, g


def test_eps_weighting_is_eps_mse():
    proc = VPLinear()
    net = TinyNet()
    x0, n, g = _batch()
    sigma = proc.training_sigma(len(x0), generator=g, dtype=torch.float64)
    t = proc.t(sigma)
    alpha = proc.alpha(t)
    x_t = alpha[:, None] * x0 + (alpha * sigma)[:, None] * n  # the VP sample in its own frame
    expected = (net(x_t, t) - n).square().mean(1)
    got = denoising_loss(NetDenoiser(net, EpsPred(proc)), x0, sigma, n, weighting="eps")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_v_weighting_is_v_mse_for_vp():
    proc = VPLinear()
    net = TinyNet(seed=2)
    x0, n, g = _batch(seed=3)
    sigma = proc.training_sigma(len(x0), generator=g, dtype=torch.float64)
    t = proc.t(sigma)
    alpha = proc.alpha(t)
    s = torch.sqrt(1 - alpha**2)  # VP: alpha^2 + s^2 = 1
    x_t = alpha[:, None] * x0 + s[:, None] * n
    v = alpha[:, None] * n - s[:, None] * x0  # Salimans & Ho 2022, sec. 4
    expected = (net(x_t, t) - v).square().mean(1)
    got = denoising_loss(NetDenoiser(net, VPred(proc)), x0, sigma, n, weighting="v")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_x0_weighting_is_x0_mse():
    proc = VPLinear()
    net = TinyNet(seed=4)
    x0, n, g = _batch(seed=5)
    sigma = proc.training_sigma(len(x0), generator=g, dtype=torch.float64)
    t = proc.t(sigma)
    alpha = proc.alpha(t)
    x_t = alpha[:, None] * (x0 + sigma[:, None] * n)
    expected = (net(x_t, t) - x0).square().mean(1)
    got = denoising_loss(NetDenoiser(net, X0Pred(proc)), x0, sigma, n, weighting="x0")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_edm_weighting_matches_edm_effective_target():
    # EDM eq. 8: lambda(sigma) c_out^2 = 1, loss = |F(c_in x, c_noise) - (x0 - c_skip x) / c_out|^2.
    sd = 0.7
    net = TinyNet(seed=6)
    x0, n, g = _batch(seed=7)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(len(x0), generator=g))
    x = x0 + sigma[:, None] * n
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    c_in = 1 / torch.sqrt(sigma**2 + sd**2)
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    expected = (net(c_in[:, None] * x, torch.log(sigma) / 4) - target).square().mean(1)
    got = denoising_loss(
        NetDenoiser(net, EDMPrecond(sd)), x0, sigma, n, weighting="edm", sigma_data=sd
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_flow_matching_equals_weighted_dsm():
    proc = RectifiedFlow()
    net = TinyNet(seed=8)
    x0, n, g = _batch(seed=9)
    t = proc.t(proc.training_sigma(len(x0), generator=g, dtype=torch.float64))
    fm = flow_matching_loss(net, x0, t, n)
    sigma = t / (1 - t)
    dsm = denoising_loss(NetDenoiser(net, FlowPred(proc)), x0, sigma, n, weighting="flow")
    torch.testing.assert_close(fm, dsm, rtol=1e-8, atol=1e-12)
    # ... and flow matching is the velocity MSE of the interpolant, written out directly.
    x_t = (1 - t)[:, None] * x0 + t[:, None] * n
    torch.testing.assert_close(fm, (net(x_t, t) - (n - x0)).square().mean(1))


def test_dsm_is_minimised_by_the_posterior_mean():
    # Data N(0, s^2): E[(a x - x0)^2] = (a - 1)^2 s^2 + a^2 sigma^2, minimised at a* = s^2/(s^2 + sigma^2).
    s, sig = 1.3, 0.8
    g = torch.Generator().manual_seed(0)
    x0 = s * torch.randn(400_000, 1, generator=g)
    n = torch.randn(400_000, 1, generator=g)
    sigma = torch.full((len(x0),), sig)
    a_star = s**2 / (s**2 + sig**2)

    def loss(a):
        return denoising_loss(lambda x, sg: a * x, x0, sigma, n, weighting="x0").mean().item()

    exact = (a_star - 1) ** 2 * s**2 + a_star**2 * sig**2
    assert loss(a_star) == pytest.approx(exact, rel=1e-2)
    assert loss(a_star) < loss(a_star - 0.05) and loss(a_star) < loss(a_star + 0.05)


def test_weightings_closed_forms():
    sigma = torch.tensor([0.01, 0.5, 1.0, 20.0])
    sd = 0.5
    torch.testing.assert_close(get_weighting("eps")(sigma, sd), 1 / sigma**2)
    torch.testing.assert_close(get_weighting("x0")(sigma, sd), torch.ones_like(sigma))
    snr = 1 / sigma**2
    torch.testing.assert_close(get_weighting("v")(sigma, sd), snr + 1)
    torch.testing.assert_close(
        get_weighting("edm")(sigma, sd), (sigma**2 + sd**2) / (sigma * sd) ** 2
    )
    t = sigma / (1 + sigma)
    torch.testing.assert_close(get_weighting("flow")(sigma, sd), 1 / t**2)
    assert set(WEIGHTINGS) == {"eps", "x0", "v", "edm", "flow"}
    assert all(default_weighting(k) == k for k in WEIGHTINGS)


def test_drop_labels():
    labels = torch.arange(10_000) % 7
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    assert (drop_labels(labels, 0.0, u) == labels).all()
    assert (drop_labels(labels, 1.0, u) == -1).all()
    out = drop_labels(labels, 0.2, u)
    dropped = out == -1
    assert abs(dropped.double().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 10_000)
    assert (out[~dropped] == labels[~dropped]).all()


def test_errors():
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        get_weighting("snr")
    with pytest.raises(ValueError, match="label dropout"):
        drop_labels(torch.zeros(3, dtype=torch.long), 1.5, torch.rand(3))
    with pytest.raises(ValueError, match="parameterization 'velocity'"):
        default_weighting("velocity")
    assert default_weighting("score") == "eps"


# -- the documented weight table (loss.WEIGHTINGS, docs/extending.md) -------------------------------

VP_TYPE = {"vp", "vp_cosine", "ddpm", "ddpm_scaled_linear"}  # alpha^2 + s^2 = 1
SD = 0.7
#: What the docs say, written out here: parameterisation -> (the weight w(sigma) its default weighting
#: applies, the processes under which w |D - x0|^2 is the plain MSE of the network's output).
#: "s^2": the score default is s(t)^2 times the score MSE (Song et al. 2021, eq. 7).
DOCUMENTED = {
    "eps": (lambda s: 1 / s**2, "all"),
    "x0": (lambda s: torch.ones_like(s), "all"),
    "v": (lambda s: (1 + s**2) / s**2, VP_TYPE),
    "edm": (lambda s: (s**2 + SD**2) / (s * SD) ** 2, "all"),
    "flow": (lambda s: ((1 + s) / s) ** 2, {"flow"}),
    "score": (lambda s: 1 / s**2, "s^2"),
}


def test_documented_table_covers_every_parameterization():
    assert set(DOCUMENTED) == set(PARAMETERIZATIONS)


@pytest.mark.parametrize("pname", sorted(PARAMETERIZATIONS))
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_loss_weight_is_what_the_docs_say_for_every_process(name, pname):
    # The network returns its target plus a known error delta, the target written from each paper's
    # definition in the process's own frame (test_denoiser's oracle, EDM Table 1 for edm). The default
    # loss must be w_doc(sigma) |D - x0|^2, and equal the network's own MSE |delta|^2 exactly for the
    # pairs the docs list (s^2 |delta|^2 for score), and differ from it for the others.
    process = get_process(name)
    if name in DISCRETE:
        t = torch.tensor([10.0, 100.0, 400.0, 800.0])
    else:
        t = process.t_min + (process.t_max - process.t_min) * torch.tensor([0.1, 0.3, 0.6, 0.9])
    alpha_fn, s_fn = REFERENCE[name]
    a, s = alpha_fn(t), s_fn(t)
    sigma = s / a
    g = torch.Generator().manual_seed(11)
    x0, eps, delta = torch.randn(3, 4, 5, generator=g)
    x = x0 + sigma[:, None] * eps
    if pname == "edm":
        param = EDMPrecond(SD)
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / torch.sqrt(sigma**2 + SD**2)
        target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    else:
        param = get_parameterization(pname, process=process)
        try:
            target = _oracle_target(pname, name, t, x0, eps)
        except NotImplementedError:  # flow on a discrete table: only "differs" is claimed below
            target = param.target(x, sigma, x0)
    den = NetDenoiser(lambda x_in, c_noise: target + delta, param)
    loss = denoising_loss(den, x0, sigma, eps, weighting=default_weighting(pname), sigma_data=SD)
    w_doc, plain_for = DOCUMENTED[pname]
    err = (den(x, sigma) - x0).square().mean(1)
    torch.testing.assert_close(loss, w_doc(sigma) * err, rtol=1e-9, atol=0)
    mse = delta.square().mean(1)
    if plain_for == "all" or name in plain_for:
        torch.testing.assert_close(loss, mse, rtol=1e-6, atol=0)
    elif plain_for == "s^2":
        torch.testing.assert_close(loss, s**2 * mse, rtol=1e-6, atol=0)
    else:
        assert not torch.allclose(loss, mse, rtol=1e-2, atol=0), (name, pname, loss / mse)
