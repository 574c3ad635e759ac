"""Schedules against their closed forms, the process they come from, and the exact ODE solution."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit import schedules as S
from scorekit.analytic import gaussian
from scorekit.process import VE, DiscreteProcess

SMIN, SMAX = 0.01, 157.4

ALL = [
    ("karras", {}),
    ("karras", {"rho": 3.0}),
    ("loglinear", {}),
    ("polyexponential", {}),
    ("polyexponential", {"rho": 2.0}),
    ("uniform_t", {"process": "vp"}),
    ("uniform_t", {"process": DiscreteProcess.linear()}),
]


@pytest.mark.parametrize(("name", "opts"), ALL)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_contract(name, opts, n):
    proc = opts.get("process")
    smin, smax = (0.05, 80.0) if proc == "vp" else (SMIN, SMAX)
    if isinstance(proc, DiscreteProcess):  # the table's own range, 0.0100005 .. 157.407
        smin, smax = proc.sigma_min, proc.sigma_max
    s = S.get_schedule(name)(n, smin, smax, **opts)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert math.isclose(float(s[0]), smax, rel_tol=1e-12)
    if n > 1:
        assert math.isclose(float(s[-2]), smin, rel_tol=1e-12)


def test_karras_closed_form():
    # rho = 1 is linear in sigma; the midpoint of n = 3 is the rho-mean of the ends.
    s = S.karras(5, 1.0, 9.0, rho=1.0)
    torch.testing.assert_close(s, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    s = S.karras(3, 0.002, 80.0, rho=7.0)
    mid = ((0.002 ** (1 / 7) + 80.0 ** (1 / 7)) / 2) ** 7
    assert math.isclose(float(s[1]), mid, rel_tol=1e-13)


def test_loglinear_is_geometric_and_polyexponential_rho1():
    s = S.loglinear(9, 0.01, 100.0)
    ratios = s[1:-1] / s[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 10 ** (-4 / 8)))
    torch.testing.assert_close(S.polyexponential(9, 0.01, 100.0, rho=1.0), s)
    # rho = 2 at u = 1/2: log s = log smin + (1/2)^2 (log smax - log smin).
    p = S.polyexponential(3, 0.01, 100.0, rho=2.0)
    assert math.isclose(float(p[1]), math.exp(math.log(0.01) + 0.25 * math.log(1e4)), rel_tol=1e-13)


@pytest.mark.parametrize("n", [3, 7, 50])
@pytest.mark.parametrize("opts", [{}, {"sigma_split": 2.0, "n_low": 2}, {"rho": 3.0}])
def test_two_phase_contract(n, opts):
    s = S.get_schedule("two_phase")(n, SMIN, SMAX, **opts)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert math.isclose(float(s[0]), SMAX, rel_tol=1e-12)
    assert math.isclose(float(s[-2]), SMIN, rel_tol=1e-12)


def test_two_phase_closed_form():
    # n = 20, n_low = 6: 14 equal log-steps from 40 to 2 (the 15th entry is 2 itself), then the
    # karras ramp from 2 to 0.1 written out from EDM eq. 5.
    s = S.two_phase(20, 0.1, 40.0, sigma_split=2.0, n_low=6)
    ratios = s[1:15] / s[:14]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (2.0 / 40.0) ** (1 / 14)))
    assert math.isclose(float(s[14]), 2.0, rel_tol=1e-12)
    u = torch.arange(6, dtype=torch.float64) / 5
    ramp = (2.0 ** (1 / 7) + u * (0.1 ** (1 / 7) - 2.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[14:-1], ramp, rtol=1e-13, atol=0)
    # Defaults: the split at the geometric middle of the range, 30% of the steps below it.
    d = S.two_phase(20, 0.1, 40.0)
    assert math.isclose(float(d[14]), math.sqrt(0.1 * 40.0), rel_tol=1e-12)


def test_uniform_t_matches_the_process():
    # VE: sigma(t) = smin (smax/smin)^t is exponential in t, so uniform t is uniform log-sigma.
    torch.testing.assert_close(
        S.uniform_t(12, 0.02, 50.0, process=VE(0.01, 80.0)), S.loglinear(12, 0.02, 50.0)
    )
    # EDM: sigma = t, so uniform t is linear in sigma (karras with rho = 1).
    torch.testing.assert_close(
        S.uniform_t(6, 0.5, 3.0, process="edm"), S.karras(6, 0.5, 3.0, rho=1.0)
    )
    # DDPM table: t = 990, 980, ..., 0 land on the table's entries, computed here from the betas.
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    table = ((1 - abar) / abar).sqrt()
    s = S.uniform_t(100, float(table[0]), float(table[990]), process="ddpm")
    torch.testing.assert_close(s[:-1], table.flip(0)[9::10], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: S.karras(0, 0.1, 1.0), "n"),
        (lambda: S.loglinear(2.5, 0.1, 1.0), "n"),
        (lambda: S.karras(5, 1.0, 1.0), "sigma_min"),
        (lambda: S.polyexponential(5, 2.0, 1.0), "sigma_min"),
        (lambda: S.loglinear(5, 0.0, 1.0), "sigma_min"),
        (lambda: S.karras(5, 0.1, 1.0, rho=0.0), "rho"),
        (lambda: S.uniform_t(5, 0.001, 1.0, process="ddpm"), "range"),
        (lambda: S.uniform_t(5, 0.1, 1.0, process="nope"), "allowed"),
        (lambda: S.get_schedule("cosine"), "karras"),
        (lambda: S.two_phase(2, 0.1, 40.0), "n >= 3"),
        (lambda: S.two_phase(10, 0.1, 40.0, n_low=1), "n_low"),
        (lambda: S.two_phase(10, 0.1, 40.0, n_low=10), "n_low"),
        (lambda: S.two_phase(10, 0.1, 40.0, sigma_split=40.0), "sigma_split"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pf_ode_reference_exact_for_a_gaussian():
    # For N(m, C = U diag(lam) U^T): x(sigma) = m + U diag(sqrt((lam + sigma^2)/(lam + s0^2))) U^T (x0 - m).
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov, m = (
        a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64),
        torch.tensor([1.0, -2.0, 0.5]).double(),
    )
    gm = gaussian(m, cov)
    lam, u = torch.linalg.eigh(cov)
    x0 = 20.0 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    exact = m + ((x0 - m) @ u) * ((lam / (lam + 20.0**2)).sqrt()) @ u.T
    got = S.pf_ode_reference(gm, x0, 20.0, 0.0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-9)


def test_optimized_moved_with_a_message_naming_its_new_home():
    with pytest.raises(AttributeError, match=r"scorekit\.samplers\.optimized"):
        S.optimized  # noqa: B018
