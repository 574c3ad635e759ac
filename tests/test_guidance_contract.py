"""Every guided denoiser runs with every sampler in ``scorekit.samplers.REGISTRY``: shape and dtype
kept, finite, the network evaluations counted here equal the rule's stated cost times the sampler's
calls, and sample ``i`` does not depend on the batch it is drawn in."""

from __future__ import annotations

import pytest
import torch

from scorekit.guidance import (
    adaptive_guidance,
    apg,
    autoguidance,
    cads,
    cfg,
    class_target,
    classifier_guidance,
    dynamic_threshold,
    minority_guidance,
    reward_guidance,
    tcfg,
)
from scorekit.samplers import ADAPTIVE, REGISTRY, nfe
from scorekit.samplers.common import row_generators
from scorekit.schedules import karras

T = class_target("ring6")

#: Options for the samplers whose defaults do not suit 3 steps on sigma in [0.05, 10].
OPTIONS = {
    "restart": {"t_min": 0.3, "t_max": 2.0, "restarts": 1, "restart_steps": 2},
    "bespoke": {"base": "dpmpp_2m"},
    "adaptive_ode": {"rtol": 1e-2, "atol": 1e-2},
    "adaptive_sde": {"rtol": 0.5, "atol": 0.3},
}


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, sigma, **cond):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls += 1
        return self.inner(x, sigma, **cond)


def _embedding_denoiser(x, sigma, cond):
    # An exact denoiser shifted by a small function of the condition embedding [B, 4].
    return T.cond(0)(x, sigma) + 0.01 * cond.mean(1).reshape(-1, *[1] * (x.ndim - 1))


def _rules(c, u, stats):
    """name -> (guided denoiser, evaluations of c and u per sampler call: (cond, uncond))."""
    emb = torch.linspace(-1, 1, 4, dtype=torch.float64)[None]
    return {
        "cfg": (cfg(c, u, 3.0), (1, 1)),
        "cfg_rescale": (cfg(c, u, 3.0, rescale=0.7), (1, 1)),
        "cfg_interval": (cfg(c, u, 3.0, interval=(0.5, 5.0)), (1, None)),
        "autoguidance": (autoguidance(c, u, 2.0), (1, 1)),
        "dynamic_threshold": (
            dynamic_threshold(cfg(c, u, 3.0), percentile=0.9, max_value=2.0),
            (1, 1),
        ),
        "apg": (apg(c, u, 4.0, eta=0.2, norm_threshold=1.0, momentum=-0.5), (1, 1)),
        "tcfg": (tcfg(c, u, 3.0), (1, 1)),
        "adaptive_guidance": (adaptive_guidance(c, u, 3.0, threshold=0.99, stats=stats), (1, None)),
        "classifier_guidance": (classifier_guidance(u, T.classifier(0), 2.0), (0, 1)),
        "reward_guidance": (
            reward_guidance(c, lambda x0: -x0.square().flatten(1).sum(1), 0.5),
            (1, 0),
        ),
        "minority_guidance": (
            minority_guidance(c, 0.5, sigma_probe=1.0, generator=row_generators(3, range(4))),
            (2, 0),
        ),
        "cads": (
            cads(c, emb, sigma_lo=0.2, sigma_hi=5.0, generator=row_generators(0, range(4))),
            (1, 0),
        ),
    }


RULES = sorted(_rules(T.cond(0), T.uncond, {}))


def _run(name, den, x, sig, gens):
    extra = {"stats": {}} if name in ADAPTIVE else {}
    out = REGISTRY[name](den, x, sig, generator=gens, **OPTIONS.get(name, {}), **extra)
    calls = extra["stats"]["nfe"] if name in ADAPTIVE else nfe(name, sig, **OPTIONS.get(name, {}))
    return out, calls


@pytest.mark.parametrize("sampler", sorted(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rule_runs_with_every_sampler_at_its_stated_cost(sampler, dtype):
    sig = karras(3, 0.05, 10.0, dtype=torch.float64)
    x0 = 10.0 * torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for rule in RULES:
        stats = {}
        c = Counting(T.cond(0) if rule != "cads" else _embedding_denoiser)
        u = Counting(T.uncond)
        den, (per_c, per_u) = _rules(c, u, stats)[rule]
        out, calls = _run(sampler, den, x0.clone(), sig, row_generators(1, range(4)))
        assert out.shape == x0.shape and out.dtype == dtype, rule
        assert torch.isfinite(out).all(), rule
        assert c.calls == per_c * calls, (rule, c.calls, calls)
        if per_u is not None:
            assert u.calls == per_u * calls, (rule, u.calls, calls)
        else:
            assert 0 < u.calls <= calls, (rule, u.calls, calls)
        if rule == "adaptive_guidance":
            assert stats["nfe"] == c.calls + u.calls


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "heun", "restart"])
@pytest.mark.parametrize("rule", RULES)
def test_sample_i_does_not_depend_on_the_batch(sampler, rule):
    sig = karras(5, 0.05, 10.0, dtype=torch.float64)
    x = 10.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def draw(rows):
        c = T.cond(0) if rule != "cads" else _embedding_denoiser
        den, _ = _rules(c, T.uncond, {})[rule]
        if rule == "cads":  # its noise generators are per row too
            emb = torch.linspace(-1, 1, 4, dtype=torch.float64)[None]
            den = cads(c, emb, sigma_lo=0.2, sigma_hi=5.0, generator=row_generators(8, rows))
        if rule == "minority_guidance":
            den = minority_guidance(c, 0.5, sigma_probe=1.0, generator=row_generators(9, rows))
        out, _ = _run(sampler, den, x[rows], sig, row_generators(2, rows))
        return out

    full = draw(list(range(5)))
    again = draw(list(range(5)))
    torch.testing.assert_close(again, full, rtol=0, atol=0)
    for i in (1, 4):
        torch.testing.assert_close(draw([i])[0], full[i], rtol=1e-10, atol=1e-10)
