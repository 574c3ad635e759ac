"""The digits guidance bench's SVDD row (scorekit.bench.guidance_digits, rule ``svdd`` / ``svdd@M``):
the samples of one candidate are the DDPM sampler's (euler_ancestral through ``draw``, the same grid
and per-row noise), the cost charged is what the test's own counters saw, and the steps fit the
budget by the formula ``1 + M (N - 1)``."""

import pytest
import torch

from scorekit.bench import guidance_digits as gd
from scorekit.runs import draw


class Toy:
    """A conditional denoiser that counts its rows and records the labels it was given."""

    def __init__(self):
        self.rows, self.labels = 0, []

    def __call__(self, x, sigma, class_labels=None):
        self.rows += x.shape[0]
        self.labels.append(class_labels.clone())
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + s**2) + 0.1 * class_labels.to(x.dtype).reshape(s.shape)


def _setup():
    info = {"process": "edm", "shape": [1, 4, 4], "sigma_data": 0.5, "num_classes": 3,
            "config": {"data": "digits", "holdout": 0.2, "seed": 0}}  # fmt: skip
    base = Toy()
    s = gd.Setup(base, info, judge=None)
    seen = []

    def clf(x, sigma):  # logits from the pixel mean: label 2 likes bright digits
        seen.append(x.shape[0])
        return x.flatten(1).mean(1, keepdim=True) * torch.tensor([[-1.0, 0.0, 1.0]], dtype=x.dtype)

    s.clf = clf
    return s, base, seen


def test_svdd_with_one_candidate_is_ddpm_on_the_label_dropped_branch():
    s, base, _ = _setup()
    labels = torch.tensor([0, 1, 2, 2])
    x = gd.sample_rule(s, "svdd@1", 2.0, labels, nfe=6, seed=3)
    ref = draw(lambda x, sig: Toy()(x, sig, class_labels=torch.full((4,), -1)), s.info, 4, nfe=6,
               sampler="euler_ancestral", seed=3)  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)  # float32: the same update, reordered
    assert all(bool((lab == -1).all()) for lab in base.labels)
    assert s.counts["net"] == base.rows == 4 * 6  # 1 + 1 * (6 - 1) per sample


def test_svdd_rows_are_charged_what_they_ran_and_fit_the_budget():
    s, base, seen = _setup()
    for budget, m in ((20, 4), (20, 2), (41, 4)):
        want_n = max(n for n in range(2, 100) if 1 + m * (n - 1) <= budget)
        assert gd._svdd_steps(f"svdd@{m}", budget) == (m, want_n)
    s.judge = None
    labels = torch.tensor([0, 1, 2])
    base.rows, seen[:] = 0, []
    gd.sample_rule(s, "svdd", 4.0, labels, nfe=5, seed=0)  # 4 candidates (the default), 5 steps
    assert base.rows == s.counts["net"] == 3 * (1 + 4 * 4)
    assert sum(seen) == s.counts["clf"] == 3 * 4 * 4
    # larger rewards are kept: at a high scale (temperature 1/w) label 2's digits end brighter than
    # label 0's, which the classifier's reward pushes darker
    x = gd.sample_rule(s, "svdd", 50.0, torch.tensor([0] * 16 + [2] * 16), nfe=5, seed=1)
    assert x[16:].mean() > x[:16].mean()


def test_minority_bench_refuses_a_classifier_without_minority_levels(tmp_path, capsys):
    import json

    from scorekit.cli import main

    (tmp_path / "classifier.json").write_text(json.dumps({"config": {"num_classes": 10}}))
    assert main(["bench", "guidance", "--digits", str(tmp_path / "run"), "--minority-run",
                 str(tmp_path), "--out", str(tmp_path / "o")]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--minority-run: " in err and "is not a minority classifier" in err, err
    assert main(["bench", "guidance", "--minority-run", str(tmp_path), "--out",
                 str(tmp_path / "o")]) != 0  # fmt: skip
    assert "--minority-run needs --digits RUN" in capsys.readouterr().err


def test_svdd_rule_names_are_checked_in_one_line():
    assert gd._svdd_steps("svdd@3", 20) == (3, 7)  # 1 + 3 * 6 = 19 <= 20 < 1 + 3 * 7
    for rule in ("svdd@x", "svdd@0", "svdd@-2"):
        with pytest.raises(ValueError, match=r"needs svdd@M with an integer M >= 1"):
            gd._candidates(rule)
