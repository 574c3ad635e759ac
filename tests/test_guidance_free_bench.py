"""The digits guidance bench's guidance-free comparison (scorekit.bench.guidance_digits, --gf-run):
one network call per sampler step for the guidance-free run, two for CFG, counted by the test's own
counting denoisers; and the one-line errors for a run that cannot be compared."""

import pytest
import torch

from scorekit.bench import guidance_digits as gd
from scorekit.runs import draw


class Toy:
    """A conditional denoiser that counts its calls and rows and records the labels it was given."""

    def __init__(self, shift: float):
        self.shift, self.calls, self.rows, self.labels = shift, 0, 0, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.rows += x.shape[0]
        self.labels.append(class_labels.clone())
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + s**2) + self.shift * class_labels.to(x.dtype).reshape(s.shape)


def _info(**config):
    cfg = {"data": "digits", "holdout": 0.2, "seed": 0, **config}
    return {"process": "edm", "shape": [1, 4, 4], "sigma_data": 0.5, "num_classes": 3,
            "config": cfg}  # fmt: skip


def _setup():
    base, gf = Toy(0.1), Toy(0.3)
    s = gd.Setup(base, _info(), judge=None, gf=(gf, _info(guidance_free=2.0)))
    return s, base, gf


def test_guidance_free_row_makes_one_call_per_step_and_cfg_two():
    s, base, gf = _setup()
    labels = torch.tensor([0, 1, 2, 2, 1])
    x = gd.sample_rule(s, "guidance_free", 1.0, labels, nfe=6, seed=3)
    # one call per sampler step, of the guidance-free run only, always with the real labels
    assert (gf.calls, gf.rows, base.calls) == (6, 6 * 5, 0)
    assert s.counts["net"] == 6 * 5
    assert all(torch.equal(lab, labels) for lab in gf.labels)
    # the samples are the guidance-free run's conditional branch alone (no CFG)
    ref = draw(lambda x, sig: gf(x, sig, class_labels=labels), s.info, 5, nfe=6, sampler="ipndm",
               seed=3)  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # CFG on the base run: two calls per step (conditional and label-dropped)
    gd.sample_rule(s, "cfg", 2.0, labels, nfe=6, seed=3)
    assert (base.calls, base.rows, s.counts["net"]) == (12, 12 * 5, 12 * 5)
    assert sum(bool((lab == -1).all()) for lab in base.labels) == 6


def test_comparison_rows_count_equal_steps_and_equal_evaluations(monkeypatch):
    s, base, gf = _setup()
    monkeypatch.setattr(gd, "_quality", lambda s, x, labels: {"n": len(x)})
    rows = gd.compare_guidance_free(s, per_class=1, steps=4, seed=2)
    got = {
        r["compare"]: (r["rule"], r["scale"], r["sampler_calls"], r["nfe_per_sample"]) for r in rows
    }
    assert got == {
        "cfg w=2, 4 steps": ("cfg", 2.0, 4, 8.0),
        "guidance-free, equal steps": ("guidance_free", 1.0, 4, 4.0),
        "guidance-free, equal evaluations": ("guidance_free", 1.0, 8, 8.0),
        "cond, equal steps": ("cond", 1.0, 4, 4.0),
        "cond, equal evaluations": ("cond", 1.0, 8, 8.0),
    }
    # the test's own counters: 10 digits (one per class) per row
    assert gf.rows == 10 * (4 + 8) and base.rows == 10 * (8 + 4 + 8)
    assert all(r["seed"] == 2 and r["n"] == 10 for r in rows)


def test_bad_guidance_free_runs_get_one_line_errors():
    info = _info()
    with pytest.raises(ValueError, match=r"--gf-run: g was not trained with --guidance-free"):
        gd._check_gf(_info(), info, "g")
    with pytest.raises(ValueError, match=r"--gf-run: g has holdout=0.1, the --digits run 0.2"):
        gd._check_gf(_info(guidance_free=2.0, holdout=0.1), info, "g")
    other = {**_info(guidance_free=2.0), "shape": [1, 8, 8]}
    with pytest.raises(ValueError, match=r"--gf-run: g makes shape \[1, 8, 8\]"):
        gd._check_gf(other, info, "g")
    gd._check_gf(_info(guidance_free=2.0), info, "g")  # the same split: accepted
    s, _, _ = _setup()
    with pytest.raises(ValueError, match=r"steps must be a whole number >= 2; got 1"):
        gd.compare_guidance_free(s, per_class=1, steps=1, seed=2)
    s.gf = None
    with pytest.raises(ValueError, match=r"needs a guidance-free run"):
        gd.compare_guidance_free(s, per_class=1, steps=4, seed=2)


def test_reward_rule_is_the_formula_and_is_charged_two_per_call():
    s, base, _ = _setup()
    w, labels = 3.0, torch.tensor([0, 2, 1])

    def clf(x, sigma):  # logits linear in the pixels' sum: a differentiable classifier
        return x.flatten(1).sum(1, keepdim=True) * torch.tensor([[1.0, -0.5, 0.25]])

    s.clf = clf
    d = gd._make("reward", s, w, labels)
    x, sig = (
        torch.randn(3, 1, 4, 4, dtype=torch.float64),
        torch.full((3,), 0.7, dtype=torch.float64),
    )
    got = d(x, sig)
    # by hand: D_u(x) + w sigma^2 grad_x log softmax(clf(D_u(x), 0.01))[label], with the toy's
    # label-dropped branch D_u = x / (1 + sigma^2) - 0.1 and the classifier's logits t k, t = sum D_u
    c = 1 / (1 + 0.7**2)
    k = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    du = x * c - 0.1
    t = du.flatten(1).sum(1)
    p = torch.softmax(t[:, None] * k, 1)
    grad_t = k[labels] - (p * k).sum(1)  # d/dt log softmax(t k)[y]
    ref = du + w * 0.49 * (grad_t * c)[:, None, None, None] * torch.ones_like(x)
    torch.testing.assert_close(got, ref)
    assert all(bool((lab == -1).all()) for lab in base.labels)  # the label-dropped branch only
    assert gd._CALLS["reward"] == 2 and s.counts["clf"] == 3
