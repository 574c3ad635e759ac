"""Guidance options of ``scorekit sample``: a rule of ``scorekit.guidance`` by name, on a trained run.

    scorekit sample --run RUN --label 3 --guidance cfg --scale 4 --out threes.png
    scorekit sample --run RUN --label 3 --guidance apg --scale 4 --guidance-options '{"momentum": -0.5}'
    scorekit sample --run RUN --label 3 --guidance autoguidance --scale 2 --weak-step 500
    scorekit sample --run RUN --label 3 --guidance classifier --scale 2 --classifier CLS_RUN
    scorekit sample --run RUN --label 3 --guidance 2          # a number: cfg of that scale (as before)
    scorekit sample --run RUN --label 3 --guidance reward --scale 2 --classifier CLS_RUN
    scorekit sample --run RUN --label 3 --guidance svdd --scale 4 --classifier CLS_RUN \
        --guidance-options '{"candidates": 8}'

``classifier``, ``reward`` and ``svdd`` also steer an unconditional run: ``--label`` is then the
classifier's class. A minority classifier (``scorekit train-classifier --minority-of RUN --levels L``)
steers any run's label-dropped branch: ``--guidance classifier --classifier CLS --label L-1`` aims at
the rarest level (Um et al., "Don't Play Favorites"). ``reward`` and ``svdd`` steer by a reward ``r(x0)`` on clean data, named by ``--reward`` (no code is
run; ``REWARDS``): ``classifier`` (the default) is ``log p(--label | x0)`` under ``--classifier`` at
the lowest noise level it was trained on. Both start from the label-dropped branch ``D_u`` and aim at
``p(x) exp(w r(x))`` (with this reward the tilted target ``p(x) p(y | x)^w``, as classifier guidance
of scale ``w``): ``reward`` by the gradient of ``r`` through Tweedie's estimate
(``scorekit.guidance.reward_guidance``: one network call and one backward pass per sampler call, any
``--sampler``); ``svdd`` is its own sampler (``scorekit.guidance.svdd``, derivative-free: ``M``
DDPM candidates per step kept with probability ``softmax(w r)``), ``--nfe`` is its number of steps
``N`` and it makes ``1 + M (N - 1)`` network evaluations (counted and reported).

Every rule here returns a denoiser, so it works with every ``--sampler``. ``--guidance-options`` is a
JSON object of the rule function's keyword options (``scorekit.guidance.<rule>``), e.g. ``rescale`` and
``interval`` for ``cfg``, ``eta`` / ``norm_threshold`` / ``momentum`` for ``apg``, ``threshold`` for
``adaptive``; a key the rule does not take is a one-line error naming the ones it does.
``--dynamic-threshold P`` wraps any of them in Imagen's percentile clamp (image data).

A rule with state across calls (``apg``'s momentum, ``adaptive``'s finished rows) is rebuilt for every
sampling pass: ``scorekit.runs.generate`` draws in chunks, and a pass starts where the noise level
rises to the highest seen so far (``PerPass``). The network evaluations actually made (rows passed to
the run's network, the weak model and the classifier) are counted and reported per sample.
``cads`` and ``minority`` draw noise from torch's global generator, seeded by ``--seed``: reproducible,
but their samples depend on ``--batch``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scorekit import guidance as G
from scorekit._util import check_number

__all__ = ["REWARDS", "RULES", "add_arguments", "build", "check_arguments", "svdd_generate"]


@dataclass
class Models:
    """What a rule is built from: the run's denoiser bound to the label, and the optional extras."""

    net: Callable[..., Tensor]  # the run's denoiser D(x, sigma, class_labels=...)
    info: dict[str, Any]
    label: int | None
    weak: Callable[..., Tensor] | None = None
    classifier: Callable[[Tensor, Tensor], Tensor] | None = None  # log p(label | x, sigma) [B]
    reward: Callable[[Tensor], Tensor] | None = None  # r(x0) [B] for reward / svdd
    counts: dict[str, int] = field(default_factory=lambda: {"net": 0, "weak": 0, "classifier": 0})

    def bound(self, which: str, label: int | None) -> Callable[[Tensor, Tensor], Tensor]:
        """The network (``"net"``) or weak model, with every row's label ``label`` (None: no labels)."""
        model = self.net if which == "net" else self.weak

        def d(x: Tensor, sigma: Tensor, **extra) -> Tensor:
            self.counts[which] += x.shape[0]
            if label is None:
                return model(x, sigma, **extra)
            return model(x, sigma, class_labels=torch.full((x.shape[0],), label, device=x.device))

        return d

    @property
    def cond(self):
        return self.bound("net", self.label)

    @property
    def uncond(self):
        return self.bound("net", -1 if self.info["num_classes"] else None)


def _cads(m: Models, w: float, **opts):
    net = m.net.net  # the raw network inside the run's NetDenoiser
    emb = net.class_emb.embed(torch.tensor([m.label], device=next(net.parameters()).device))
    lo, hi = m.info["sigma_min"], m.info["sigma_max"]
    opts = {"sigma_lo": max(lo, 0.5), "sigma_hi": min(hi, 5.0), **opts}
    noisy = G.cads(m.bound("net", None), emb.detach(), key="class_embedding", **opts)
    return noisy if w == 1 else G.cfg(noisy, m.uncond, w)


def _classifier(m: Models, w: float, **opts):
    def log_p(x: Tensor, sigma: Tensor) -> Tensor:
        m.counts["classifier"] += x.shape[0]
        return m.classifier(x, sigma)

    return G.classifier_guidance(m.uncond, log_p, w, **opts)


#: rule name -> (needs a label, needs a weak model, the rule function whose options it takes, builder)
RULES: dict[str, tuple[bool, bool, Callable, Callable]] = {
    "cfg": (True, False, G.cfg, lambda m, w, **o: G.cfg(m.cond, m.uncond, w, **o)),
    "apg": (True, False, G.apg, lambda m, w, **o: G.apg(m.cond, m.uncond, w, **o)),
    "tcfg": (True, False, G.tcfg, lambda m, w, **o: G.tcfg(m.cond, m.uncond, w, **o)),
    "adaptive": (True, False, G.adaptive_guidance,
                 lambda m, w, **o: G.adaptive_guidance(m.cond, m.uncond, w, **o)),
    "autoguidance": (False, True, G.autoguidance,
                     lambda m, w, **o: G.autoguidance(m.cond, m.bound("weak", m.label), w, **o)),
    "classifier": (True, False, G.classifier_guidance, _classifier),
    "cads": (True, False, G.cads, _cads),
    "density": (False, False, G.density_guidance,
                lambda m, w, **o: G.density_guidance(m.cond, w, **o)),
    "minority": (False, False, G.minority_guidance,
                 lambda m, w, **o: G.minority_guidance(m.cond, w, **o)),
    "reward": (True, False, G.reward_guidance,
               lambda m, w, **o: G.reward_guidance(m.uncond, m.reward, w, **o)),
    # svdd is its own sampler (svdd_generate); the denoiser it steps with is D_u
    "svdd": (True, False, G.svdd, lambda m, w, **o: m.uncond),
}  # fmt: skip

#: Built-in rewards ``r(x0) -> [B]`` of ``--guidance reward / svdd`` (``--reward NAME``).
REWARDS = {"classifier": "log p(--label | x0) under --classifier (scorekit train-classifier) at the "
                         "lowest noise level it was trained on"}  # fmt: skip
_REWARD_RULES = ("reward", "svdd")

#: Options the CLI sets itself (not allowed in --guidance-options).
_FIXED = {"cond", "uncond", "weak", "denoiser", "scale", "rate", "log_prob", "embedding", "key",
          "stats", "generator", "callback", "progress", "alpha"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--label", type=int, help="class to sample (conditional runs)")
    a(
        "--guidance",
        help=f"a rule ({', '.join(RULES)}) or a number (cfg of that scale; needs --label)",
    )
    a(
        "--scale",
        type=float,
        help="the rule's scale w (density: nats per unit of -log sigma); default 1",
    )
    a(
        "--guidance-options",
        type=json.loads,
        metavar="JSON",
        help="the rule's keyword options as a JSON object, e.g. '{\"momentum\": -0.5}'",
    )
    a("--weak-run", metavar="RUN_DIR", help="autoguidance: the weak model's run (same data shape)")
    a("--weak-step", type=int, help="autoguidance: the weak model is this checkpoint step of --run")
    a(
        "--classifier",
        metavar="CLS_DIR",
        help="classifier guidance / the classifier reward: a run of scorekit train-classifier",
    )
    a("--reward", choices=sorted(REWARDS), help="reward / svdd guidance: the reward r(x0) "
      "(classifier: log p(--label | x0) under --classifier; the default)")  # fmt: skip
    a("--dynamic-threshold", type=float, metavar="P",
      help="clamp each denoised image at its P-quantile of |x| (Imagen; image data)")  # fmt: skip


def _rule(args: argparse.Namespace) -> tuple[str | None, float | None]:
    """``(rule name or None, scale)`` from ``--guidance`` / ``--scale``; a number is cfg's scale."""
    g, scale = args.guidance, args.scale
    if g is None:
        if scale is not None:
            raise ValueError("--scale needs --guidance (a rule name, e.g. --guidance cfg)")
        return None, None
    try:
        number = float(g)
    except ValueError:
        number = None
    if number is not None:
        if scale is not None:
            raise ValueError(
                f"give --guidance {g} (cfg of scale {g}) or --guidance RULE --scale W, not both"
            )
        return "cfg", _scale("--guidance", number)
    if g not in RULES:
        raise ValueError(f"--guidance must be a number or one of {', '.join(RULES)}; got {g!r}")
    if g == "density":
        return g, check_number("--scale", 1.0 if scale is None else scale)
    return g, _scale("--scale", 1.0 if scale is None else scale)


def _scale(option: str, v: float) -> float:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(
            f"{option} must be a finite number >= 0 (0: unconditional, 1: conditional); got {v!r}"
        )
    return v


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the guidance options that can be checked before the run is loaded."""
    rule, _ = _rule(args)
    opts = args.guidance_options
    if opts is not None and (rule is None or not isinstance(opts, dict)):
        raise ValueError("--guidance-options must be a JSON object and needs --guidance RULE; "
                         f"got {opts!r}")  # fmt: skip
    if rule is not None:
        _check_options(rule, opts or {})
    if (args.weak_run or args.weak_step is not None) and rule != "autoguidance":
        raise ValueError("--weak-run / --weak-step need --guidance autoguidance")
    if rule == "autoguidance" and (args.weak_run is None) == (args.weak_step is None):
        raise ValueError(
            "--guidance autoguidance needs the weak model: --weak-run RUN_DIR or --weak-step N"
        )
    reward = getattr(args, "reward", None)
    if reward is not None and rule not in _REWARD_RULES:
        raise ValueError(f"--reward {reward} needs --guidance reward or svdd")
    if rule in _REWARD_RULES and (reward or "classifier") not in REWARDS:
        raise ValueError(f"--reward must be one of {', '.join(REWARDS)}; got {reward!r}")
    needs_classifier = rule == "classifier" or rule in _REWARD_RULES
    if (args.classifier is None) == needs_classifier:
        raise ValueError(
            "--guidance classifier and --classifier CLS_DIR go together (--classifier is also the "
            "reward of --guidance reward / svdd)"
            if rule not in _REWARD_RULES
            else f"--guidance {rule} with --reward classifier needs --classifier CLS_DIR"
        )
    if rule == "svdd" and args.sampler != "dpmpp_2m":
        raise ValueError(f"--guidance svdd is its own sampler (SVDD on DDPM steps); leave --sampler "
                         f"out; got --sampler {args.sampler}")  # fmt: skip
    if rule == "svdd" and _rule(args)[1] == 0:
        raise ValueError("--scale for svdd must be > 0 (candidates are kept with probability "
                         "softmax(w r)); got 0")  # fmt: skip
    if args.dynamic_threshold is not None:
        check_number("--dynamic-threshold", args.dynamic_threshold, low=0, high=1, low_ok=False)
    if rule is not None and RULES[rule][0] and args.label is None:
        raise ValueError(f"--guidance {rule} needs --label (the class to guide towards)")


def _check_options(rule: str, opts: dict) -> None:
    takes = [p.name for p in inspect.signature(RULES[rule][2]).parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.name not in _FIXED]  # fmt: skip
    bad = sorted(set(opts) - set(takes))
    if bad:
        raise ValueError(
            f"--guidance-options: {rule} takes {', '.join(takes) or 'no options'}; got {', '.join(bad)}"
        )


def _check_label(info: dict, label: int | None, rule: str | None = None) -> None:
    k = int(info.get("num_classes", 0) or 0)
    if k == 0 and rule in ("classifier", *_REWARD_RULES):
        return  # the label is the classifier's class (load_classifier checks its range)
    if label is not None and k == 0:
        raise ValueError(
            "--label: this run is unconditional (trained without --cond); no label is allowed"
        )
    if label is not None and not 0 <= label < k:
        raise ValueError(f"--label must be in 0..{k - 1} for this run ({k} classes); got {label}")


def _is_minority(folder) -> bool:
    """Whether the classifier in ``folder`` was trained on minority levels (``--minority-of``)."""
    try:
        record = json.loads((Path(folder) / "classifier.json").read_text())
    except (OSError, ValueError):
        return False  # load_classifier reports a missing or unreadable classifier
    labels = record.get("labels") if isinstance(record, dict) else None
    return isinstance(labels, dict) and labels.get("kind") == "minority"


def build(args: argparse.Namespace, denoiser, info: dict, *, device) -> tuple[Any, Models | None]:
    """The denoiser to sample (guided, label-bound, or the run's own) and the models it counts.

    Returns ``(denoiser, models)``; ``models`` is None when neither ``--label`` nor ``--guidance``
    is given (the run's denoiser is then sampled as it is)."""
    rule, scale = _rule(args)
    # a minority classifier's classes are levels of the run's label-dropped branch, not its classes
    levels = rule == "classifier" and _is_minority(args.classifier)
    _check_label({**info, "num_classes": 0} if levels else info, args.label, rule)
    if rule is None and args.label is None:
        if args.dynamic_threshold is not None:
            return G.dynamic_threshold(denoiser, percentile=args.dynamic_threshold), None
        return denoiser, None
    m = Models(denoiser, info, args.label)
    if rule == "autoguidance":
        m.weak = load_weak(args, info, device=device)
    if rule == "classifier":
        from scorekit.train.classifier import load_classifier

        m.classifier = load_classifier(args.classifier, info, label=args.label, device=device)
    if rule in _REWARD_RULES:
        m.reward = classifier_reward(args.classifier, info, args.label, m.counts, device=device)
    if rule == "cads" and not info["num_classes"]:
        raise ValueError("--guidance cads needs a class-conditional run")

    def make():
        d = m.cond if rule is None else RULES[rule][3](m, scale, **(args.guidance_options or {}))
        if args.dynamic_threshold is not None:
            d = G.dynamic_threshold(d, percentile=args.dynamic_threshold)
        return d

    make()  # a bad option value is a one-line error now, not after the first chunk
    # cads and minority draw their noise from torch's global generator: seeded, so a command is
    # reproducible (their samples do depend on --batch, unlike the deterministic rules').
    torch.manual_seed(args.seed)
    for key in m.counts:
        m.counts[key] = 0
    return PerPass(make), m


def classifier_reward(folder, info: dict, label: int, counts: dict, *, device) -> Callable:
    """The ``classifier`` reward: ``r(x0) = log p(label | x0, sigma_lo)`` of the noisy classifier in
    ``folder`` at the lowest noise level it was trained on (``sigma_lo``: clean data), counting the
    rows it is evaluated on in ``counts["classifier"]``."""
    from scorekit.train.classifier import load_classifier

    log_p = load_classifier(folder, info, label=label, device=device)
    record = json.loads((Path(folder) / "classifier.json").read_text())
    lo = float(record.get("train", {}).get("sigma_range", [0.01])[0])

    def r(x0: Tensor) -> Tensor:
        counts["classifier"] += x0.shape[0]
        return log_p(x0, torch.full((x0.shape[0],), lo, dtype=x0.dtype, device=x0.device))

    return r


class PerPass:
    """A denoiser that builds a fresh ``make()`` for every sampling pass (stateful rules: apg, adaptive).

    A pass starts at the first call, whenever the batch size changes, and whenever the noise level
    rises above the previous call's *and* reaches the highest level seen so far (a new pass restarting
    at ``sigma_max``; a restart sampler's jumps stay below it, and a stochastic sampler's churned
    first level is the new highest)."""

    def __init__(self, make: Callable[[], Callable]):
        self.make, self.current, self.rows, self.prev, self.top = make, None, -1, 0.0, 0.0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma.max())
        if self.current is None or x.shape[0] != self.rows or (s > self.prev and s >= self.top):
            self.current, self.rows = self.make(), x.shape[0]
        self.prev, self.top = s, max(self.top, s)
        return self.current(x, sigma)


def svdd_generate(args: argparse.Namespace, denoiser, m: Models, info: dict, *, nfe: int,
                  dist=None) -> Tensor:  # fmt: skip
    """``--guidance svdd``: ``--n`` samples by ``scorekit.guidance.svdd`` with ``m.reward``.

    ``denoiser`` is ``build``'s (the label-dropped branch); the grid is the one ``sample()`` lays for
    ``nfe`` steps of a one-call sampler on the run's range and ``--schedule``; row ``i`` starts from
    and draws its candidates from the generator of ``(--seed, i)`` as ``sample()`` does, so sample
    ``i`` does not depend on ``--batch``, and ``candidates = 1`` is ``euler_ancestral`` (the DDPM
    step). Temperature ``alpha = 1 / --scale``. One process (not under torchrun).
    """
    from scorekit.samplers.common import row_generators
    from scorekit.schedules import get_schedule
    from scorekit.train.preview import sampling_range

    if dist is not None and dist.world > 1:
        raise ValueError(
            f"--guidance svdd runs in one process; got {dist.world} (run it without torchrun)"
        )
    _, w = _rule(args)
    lo, hi = sampling_range(info["process"], info.get("sigma_data", 4.0))
    drop = lo <= 0.002  # as sample(): the grid laid to 0.002 and its last nonzero point dropped
    s = [float(v) for v in get_schedule(args.schedule)(nfe + drop, 0.002 if drop else lo, hi)]
    sigmas = torch.tensor([*s[:-2], 0.0] if drop else s, dtype=torch.float64)
    opts = {"candidates": 4, **(args.guidance_options or {})}
    device = dist.device if dist is not None else "cpu"
    parts = []
    for start in range(0, args.n, args.batch):
        gens = row_generators(args.seed, range(start, min(args.n, start + args.batch)), device)
        x = torch.stack(
            [torch.randn(tuple(info["shape"]), generator=g, device=device) for g in gens]
        )
        with torch.no_grad():
            out = G.svdd(denoiser, m.reward, x * sigmas[0].item(), sigmas, generator=gens,
                         alpha=1.0 / w, **opts)  # fmt: skip
        parts.append(out.cpu())
    return torch.cat(parts)


def load_weak(args: argparse.Namespace, info: dict, *, device):
    """The weak model for autoguidance: ``--weak-run``'s newest checkpoint or ``--run``'s ``--weak-step``."""
    from scorekit.runs import load_run

    if args.weak_run is not None:
        weak, winfo = load_run(args.weak_run, weights=args.weights, device=device)
        where = f"--weak-run {args.weak_run}"
    else:
        folder = Path(args.run) / "checkpoints" / f"step_{args.weak_step:09d}"
        if not (folder / "manifest.json").is_file():
            have = sorted(int(p.name[5:]) for p in (Path(args.run) / "checkpoints").glob("step_*")
                          if p.name[5:].isdigit() and (p / "manifest.json").is_file())  # fmt: skip
            raise ValueError(f"--weak-step {args.weak_step}: {args.run} has no checkpoint at that step; "
                             f"it has steps {have}")  # fmt: skip
        weak, winfo = _load_step(folder, args.weights, device)
        where = f"--weak-step {args.weak_step}"
    for key in ("shape", "num_classes", "normalization"):
        if winfo.get(key) != info.get(key):
            raise ValueError(f"{where}: the weak model's {key} is {winfo.get(key)!r}; the run's is "
                             f"{info.get(key)!r} (autoguidance needs a model of the same data)")  # fmt: skip
    return weak


def _load_step(folder: Path, weights: str, device):
    """``(denoiser, info)`` of one checkpoint folder (the run's own loader reads only the newest)."""
    from scorekit import nets
    from scorekit.denoiser import build_denoiser
    from scorekit.train import checkpoint as ckpt

    tensors, state = ckpt.load(folder)
    try:
        net = nets.build(state["net"])
        net.load_state_dict(tensors[weights])
        config, info = state["config"], dict(state["data"])
        den = build_denoiser(net, process=config["process"], param=config["param"],
                             sigma_data=info["sigma_data"])  # fmt: skip
    except (RuntimeError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {folder}: {str(e).splitlines()[0][:200]}") from None
    info["num_classes"] = int(state["net"].get("num_classes", 0) or 0)
    return den.to(device).eval().requires_grad_(False), info


def nfe_line(m: Models | None, n: int) -> str:
    """``"; NFE per sample: 40.0 network (+ 20.0 weak, + 20.0 classifier)"``, or ``""``."""
    if m is None or n == 0:
        return ""
    parts = [f"{m.counts['net'] / n:.1f} network"]
    parts += [f"{m.counts[k] / n:.1f} {k}" for k in ("weak", "classifier") if m.counts[k]]
    return "; evaluations per sample: " + " + ".join(parts)
