"""Network adapters: every parameterisation round-trips for every process, against an oracle network.

The oracle knows ``x0`` and ``eps``. It returns the parameterisation's target computed from its
definition in the process's own frame ``x_t = alpha(t) x0 + s(t) eps`` (with ``alpha`` and ``s``
written here from each paper's formulas, not read from ``scorekit.process``):

    eps -> eps,  x0 -> x0,  v -> alpha eps - s x0,  score -> -eps / s,  flow -> alpha' x0 + s' eps

(``alpha'``, ``s'`` by central finite differences). ``NetDenoiser`` must then return ``x0`` and
``param.target`` must return the oracle's output.
"""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.denoiser import (
    PARAMETERIZATIONS,
    EDMPrecond,
    NetDenoiser,
    Parameterization,
    build_denoiser,
    get_parameterization,
)
from scorekit.process import PROCESSES, get_process


def _vp_alpha(t, bmin=0.1, bmax=20.0):
    # Song et al. 2021, eq. 33: mean coefficient exp(-t^2 (bmax - bmin) / 4 - t bmin / 2).
    return torch.exp(-0.25 * t**2 * (bmax - bmin) - 0.5 * t * bmin)


def _vp_s(t, bmin=0.1, bmax=20.0):
    # s^2 = 1 - alpha^2 = -expm1(-2 log(1/alpha)), written without cancellation at small t.
    return torch.sqrt(-torch.expm1(-0.5 * t**2 * (bmax - bmin) - t * bmin))


def _cosine_angles(t, s=0.008):
    return (t + s) / (1 + s) * math.pi / 2, s / (1 + s) * math.pi / 2


def _cosine_alpha(t, s=0.008):
    # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi / 2)^2.
    phi, phi0 = _cosine_angles(t, s)
    return torch.cos(phi) / math.cos(phi0)


def _cosine_s(t, s=0.008):
    # 1 - alpha^2 = (cos^2 phi0 - cos^2 phi) / cos^2 phi0 = sin(phi - phi0) sin(phi + phi0) / cos^2 phi0.
    phi, phi0 = _cosine_angles(t, s)
    return torch.sqrt(torch.sin(phi - phi0) * torch.sin(phi + phi0)) / math.cos(phi0)


def _ddpm_abar(betas):
    return torch.cumprod(1 - betas, 0)


def _table_alpha(abar):
    # Only integer steps are defined by the table; interpolate sqrt(abar) in log-SNR like the process
    # would not be independent, so the oracle is evaluated at integer t for these processes.
    def alpha(t):
        return abar[t.round().long()].sqrt()

    return alpha


_DDPM = _ddpm_abar(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
_DDPM_SL = _ddpm_abar(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2)

#: process name -> (alpha(t), s(t)) from the papers' definitions, for the default constructor arguments.
REFERENCE = {
    "vp": (_vp_alpha, _vp_s),
    "vp_cosine": (_cosine_alpha, _cosine_s),
    "ve": (torch.ones_like, lambda t: 0.01 * (50.0 / 0.01) ** t),
    "edm": (torch.ones_like, lambda t: t),
    "flow": (lambda t: 1 - t, lambda t: t),
    "ddpm": (_table_alpha(_DDPM), lambda t: (1 - _table_alpha(_DDPM)(t) ** 2).sqrt()),
    "ddpm_scaled_linear": (
        _table_alpha(_DDPM_SL),
        lambda t: (1 - _table_alpha(_DDPM_SL)(t) ** 2).sqrt(),
    ),
}
DISCRETE = {"ddpm", "ddpm_scaled_linear"}
PROCESS_PARAMS = sorted(n for n in PARAMETERIZATIONS if n != "edm")


def test_reference_table_covers_the_registry():
    # A new process needs its definition here, so the round trip below checks it independently.
    assert set(REFERENCE) == set(PROCESSES)


def _times(name: str, process) -> torch.Tensor:
    """Times over the whole range, endpoints included (integer steps for a discrete table)."""
    if name in DISCRETE:
        return torch.tensor(
            [0.0, 1.0, 10.0, 250.0, 500.0, 900.0, process.t_max], dtype=torch.float64
        )
    u = torch.tensor([0.0, 1e-3, 0.05, 0.3, 0.5, 0.8, 0.99, 1.0], dtype=torch.float64)
    return process.t_min + (process.t_max - process.t_min) * u


def _oracle_target(pname: str, name: str, t, x0, eps):
    alpha_fn, s_fn = REFERENCE[name]
    a, s = alpha_fn(t)[:, None], s_fn(t)[:, None]
    if pname == "eps":
        return eps
    if pname == "x0":
        return x0
    if pname == "v":
        return a * eps - s * x0
    if pname == "score":
        return -eps / s
    if pname == "flow":
        if name in DISCRETE:  # piecewise in t: differentiate the process's own interpolation
            raise NotImplementedError
        # Relative step: s(t) behaves like sqrt(t) near 0 for VP processes.
        h = 1e-5 * torch.clamp(t, min=1e-3)[:, None]
        tp, tm = t + h[:, 0], t - h[:, 0]
        da = (alpha_fn(tp) - alpha_fn(tm))[:, None] / (2 * h)
        ds = (s_fn(tp) - s_fn(tm))[:, None] / (2 * h)
        return da * x0 + ds * eps
    raise KeyError(f"no oracle for parameterisation {pname!r}: add its definition to this test")


@pytest.mark.parametrize("pname", PROCESS_PARAMS)
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_adapter_round_trip_with_oracle_network(name, pname):
    process = get_process(name)
    param = get_parameterization(pname, process=process)
    t = _times(name, process)
    b = t.shape[0]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, generator=g, dtype=torch.float64)
    alpha_fn, s_fn = REFERENCE[name]
    a, s = alpha_fn(t), s_fn(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    x, sigma = x_t / a[:, None], s / a  # the sigma frame
    if pname == "flow" and name in DISCRETE:
        # The table's interpolation is smooth inside a step: take mid-step times.
        t = torch.tensor(
            [0.5, 1.5, 10.25, 250.5, 500.75, 900.5, process.t_max - 0.5], dtype=t.dtype
        )
        a, s = process.alpha(t), process.s(t)
        x_t = a[:, None] * x0 + s[:, None] * eps
        x, sigma = x_t / a[:, None], s / a
        h = 1e-5 * torch.ones_like(t)[:, None]
        da = (process.alpha(t + h[:, 0]) - process.alpha(t - h[:, 0]))[:, None] / (2 * h)
        ds = (process.s(t + h[:, 0]) - process.s(t - h[:, 0]))[:, None] / (2 * h)
        expected = da * x0 + ds * eps
    else:
        expected = _oracle_target(pname, name, t, x0, eps)
    calls = []

    def oracle(x_in, c_noise):
        calls.append(1)
        # The network sees the process's own frame and time: x_t and c_noise = t.
        torch.testing.assert_close(x_in, x_t, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c_noise, t, rtol=1e-9, atol=1e-9)
        return expected

    den = NetDenoiser(oracle, param)
    out = den(x, sigma)
    assert calls == [1]
    scale = 1.0 + sigma[:, None]
    torch.testing.assert_close(out, x0, rtol=0, atol=float(1e-7 * scale.max()))
    torch.testing.assert_close(
        param.target(x, sigma, x0), expected, rtol=1e-6, atol=1e-7 * float(expected.abs().max())
    )
    # In float32 the denoiser keeps ~float32 accuracy relative to the noise scale 1 + sigma (no
    # digits lost to a round trip through t, e.g. 1 - t near t = 1 for the linear interpolant).
    out32 = NetDenoiser(lambda x_in, c_noise: expected.float(), param)(x.float(), sigma.float())
    assert out32.dtype == torch.float32
    err = float(((out32.double() - x0).abs() / scale).max())
    assert err < 4e-6, f"float32 round trip error {err:.2e} relative to 1 + sigma"


def _edm_table1(sigma, sd):
    # Karras et al. 2022, Table 1 ("Network and preconditioning", EDM column).
    return (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / torch.sqrt(sigma**2 + sd**2),
        1 / torch.sqrt(sd**2 + sigma**2),
        0.25 * torch.log(sigma),
    )


@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
def test_edm_preconditioning_table1(sd):
    sigma = torch.tensor([2e-3, 0.1, 0.5, 1.0, 7.0, 80.0, 1e3], dtype=torch.float64)
    param = EDMPrecond(sigma_data=sd)
    for got, want in zip(param.scalings(sigma), _edm_table1(sigma, sd), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    x0 = sd * torch.randn(7, 2, 2, generator=g, dtype=torch.float64)
    x = x0 + sigma[:, None, None] * torch.randn(7, 2, 2, generator=g, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = _edm_table1(sigma, sd)
    f_star = (x0 - c_skip[:, None, None] * x) / c_out[:, None, None]  # EDM eq. 8 target

    def oracle(x_in, c):
        torch.testing.assert_close(x_in, c_in[:, None, None] * x)
        torch.testing.assert_close(c, c_noise)
        return f_star

    torch.testing.assert_close(NetDenoiser(oracle, param)(x, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(param.target(x, sigma, x0), f_star, rtol=1e-10, atol=1e-10)


def test_edm_c_noise_finite_at_sigma_zero():
    assert torch.isfinite(torch.stack(EDMPrecond().scalings(torch.zeros(3)))).all()


@pytest.mark.parametrize("pname", sorted(PARAMETERIZATIONS))
def test_net_denoiser_contract(pname):
    # Shape and dtype kept for image-shaped input; sigma as a float or a [B] tensor; float32 works.
    param = get_parameterization(pname)
    net = torch.nn.Conv2d(3, 3, 1)

    def raw_net(x_in, c_noise):
        return net(x_in) * (1 + 0 * c_noise.reshape(-1, 1, 1, 1))

    den = NetDenoiser(raw_net, param)
    x = torch.randn(4, 3, 5, 5)
    out = den(x, torch.full((4,), 0.7))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(den(x, 0.7), out)
    with torch.inference_mode():
        assert torch.isfinite(den(x, 0.7)).all()


def test_net_denoiser_is_a_module_with_the_network_inside():
    net = torch.nn.Linear(3, 3)
    den = NetDenoiser(lambda x, c: net(x), get_parameterization("eps"))
    den2 = NetDenoiser(net, get_parameterization("eps"))
    assert isinstance(den, torch.nn.Module)
    assert set(den2.state_dict()) == {"net.weight", "net.bias"}


def test_build_denoiser_picks_the_named_adapter():
    # "edm" is EDM's preconditioning with the given sigma_data whatever the process; any other name
    # is that adapter of the named process: its c_out at sigma = 0.7 from the definitions (EDM
    # Table 1: sigma sd / sqrt(sigma^2 + sd^2); eps: -sigma; x0: 1).
    net = torch.nn.Linear(2, 2)
    sigma = torch.tensor([0.7], dtype=torch.float64)
    edm = build_denoiser(net, process="vp", param="edm", sigma_data=0.3)
    assert edm.net is net and isinstance(edm.param, EDMPrecond)
    c_out = edm.param.scalings(sigma)[1]
    torch.testing.assert_close(c_out, 0.7 * 0.3 / torch.sqrt(0.7**2 + 0.3**2 + 0 * sigma))
    eps = build_denoiser(net, process="ve", param="eps", sigma_data=0.3)
    assert eps.param.name == "eps" and eps.param.process.name == "ve"
    torch.testing.assert_close(eps.param.scalings(sigma)[1], -sigma)
    x0 = build_denoiser(net, process="flow", param="x0", sigma_data=0.3)
    torch.testing.assert_close(x0.param.scalings(sigma)[1], torch.ones_like(sigma))
    with pytest.raises(ValueError, match="unknown parameterization"):
        build_denoiser(net, process="vp", param="eps_pred", sigma_data=1.0)


def test_bad_input_messages():
    with pytest.raises(
        ValueError, match=r"unknown parameterization 'eps_pred'; allowed: \['edm', 'eps'"
    ):
        get_parameterization("eps_pred")
    with pytest.raises(ValueError, match=r"unknown process 'vpsde'; allowed: \["):
        get_parameterization("eps", process="vpsde")
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        EDMPrecond(sigma_data=0.0)
    den = NetDenoiser(lambda x, c: x[:, :2], get_parameterization("x0"))
    with pytest.raises(
        ValueError, match=r"the network returned shape \(4, 2\), expected x's shape \(4, 3\)"
    ):
        den(torch.zeros(4, 3), 1.0)
    ok = NetDenoiser(lambda x, c: x, get_parameterization("x0"))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \[B\] = \[4\]"):
        ok(torch.zeros(4, 3), torch.ones(2))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ok(torch.zeros(4, 3), -1.0)
    assert isinstance(get_parameterization("v"), Parameterization)
