"""``scorekit bench samplers --suite robust``: every sampler on imperfect denoisers, not only exact ones.

An exact denoiser has no error for a high-order extrapolation to amplify, so the exact-target suite
cannot show a sampler that diverges on a trained network. This suite runs every fixed-NFE sampler of
``REGISTRY`` with its documented default options at NFE 5, 10 and 20 on two kinds of model.

Part 1, perturbed exact mixtures (cheap, with ground truth). The exact denoiser of ``ring8`` and
``gmm64`` (``scorekit.analytic.target``) plus a smooth, fixed error of a trained network's form: the
raw output of a parameterisation ``D = c_skip x + c_out F`` (``scorekit.denoiser``) is off by
``level * g(c_in x, log sigma)``,

    D_hat(x, sigma) = D(x, sigma) + c_out(sigma) * level * g(c_in(sigma) x, log sigma),

(with ``|c_out|`` capped at ``sigma``, which only changes x0-prediction, ``c_out = 1``: the
denoiser's error must vanish as ``sigma -> 0`` or the drift ``(x - D) / sigma`` is singular there),
with ``g`` a random-feature field (``K = 64`` cosines, unit RMS per coordinate, smooth on the scale
of the network's input and of one unit of ``log sigma``) and ``level`` times ``profile(sigma) =
0.1 + 1 / (1 + sigma**2)`` the RMS raw-output error. The profile follows the diffusers-recipe UNet's
eps error against the empirical denoiser of its training digits (RMS 0.04 for sigma >= 3, 0.21 at 1,
0.52 at 0.3, 0.7-0.9 below 0.1; ``level = 0.4`` gives 0.044, 0.24, 0.41, 0.44); the EDM digits run's
raw error has the same shape (0.13-0.28 above sigma 3, 0.36 at 1, 0.5-0.76 below 0.3). The parameterisations are eps,
x0 and v on DDPM's linear table and EDM's preconditioning (sigma_data = 1: the targets are unit
scale); for eps ``c_out = -sigma``, so the denoiser's error grows with sigma, as a DDPM network's does.
Measured: the RMS distance to the exact probability-flow ODE solution of the *perturbed* field from the
same noise (the sampler's own error; deterministic samplers only), the sliced W2 to exact samples of
the unperturbed target (the quality a user sees) next to the same distance for the perturbed field's
exact ODE solution, and whether the samples stay bounded.

Part 2, trained networks on the 8x8 digits: the diffusers-recipe DDPM UNet
(``scorekit.bench.digits_unet``, trained into ``<cache>/ddpm-unet`` if absent) and scorekit's own
digits runs found under ``<cache>`` (``digits-eps``, ``digits-edm``, ``digits-cond``; a conditional run
is sampled unconditionally, its label-dropped branch, as ``scorekit sample`` does without ``--label``).
All samplers start from the same noise; the UNet is sampled with ``scorekit.sample``'s defaults
(karras from 10: it declares sigma_data 0.5, as ``from_diffusers`` does, and ``default_sigma_max``
is ``min(80, 20 sigma_data)``; the grid laid down to 0.002 with that last point dropped, as
``sample`` does when ``sigma_min`` is not given), a run with ``scorekit sample``'s range for its
process (the same grid where it ends at 0.002); the mixtures of part 1 declare no scale and run
from 80, the stricter test. Part 3
(``defaults``, ``run_defaults``) loads the UNet with ``from_diffusers`` itself and compares
``scorekit.sample(den, shape, nfe=k)`` with diffusers over five noise draws. Measured against the
held-out 20 % of the digits (never trained on): the 1-nearest-neighbour two-sample accuracy on pixels
(leave-one-out over the pooled generated and held-out sets, equal sizes; 0.5 = indistinguishable;
Lopez-Paz & Oquab 2017) and the Fréchet distance on pixels (in the digits' own units, 0..16), both on samples clipped to the pixel range
[-1, 1] (as diffusers' pipelines clip), beside their floor (training digits against held-out digits at
the same sizes). On the UNet diffusers' own ``DPMSolverMultistepScheduler`` loop (its defaults:
DPM-Solver++(2M), ``lower_order_final``) runs from the same noise at the same NFEs.

Divergence, as the issue defines it: samples not finite or with an RMS over 10x the data's, or a distance
over 10x its floor (FD for networks; sliced W2 for mixtures, whose floor is the larger of two-sample
noise and the perturbed field's own exact solution). A sampler "diverges where euler does not" when it
diverges on a model and NFE where euler does not.

References:
    Lopez-Paz & Oquab, "Revisiting Classifier Two-Sample Tests", ICLR 2017 (1-NN accuracy). Heusel et
    al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
    2017 (Fréchet distance). Rahimi & Recht, "Random Features for Large-Scale Kernel Machines", NeurIPS
    2007 (the smooth error field).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from scorekit._util import append_dims, atomic_write, atomic_write_json
from scorekit.analytic import target
from scorekit.bench.samplers.candidates import steps_within
from scorekit.denoiser import EDMPrecond, EpsPred, Parameterization, VPred, X0Pred
from scorekit.metrics import frechet_distance, sliced_wasserstein
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess
from scorekit.samplers import (
    ADAPTIVE,
    REGISTRY,
    STOCHASTIC,
    default_sigma_max,
    sample,
    schedule_sigmas,
)
from scorekit.samplers.registry import nfe as count_nfe

__all__ = [
    "PARAMS",
    "Perturbed",
    "defaults_verdict",
    "diverged",
    "nn_accuracy",
    "robust_samplers",
    "run",
    "run_defaults",
    "run_mixtures",
    "run_networks",
    "run_robust",
]

#: Parameterisation name -> adapter whose ``c_out`` / ``c_in`` shape the error (DDPM's linear table).
PARAMS: dict[str, Callable[[], Parameterization]] = {
    "eps": lambda: EpsPred(DiscreteProcess.linear()),
    "x0": lambda: X0Pred(DiscreteProcess.linear()),
    "v": lambda: VPred(DiscreteProcess.linear()),
    "edm": lambda: EDMPrecond(1.0),
}

#: FD is reported in the digits' own pixel units (0..16; the models see [-1, 1]): a factor 8 in length.
PIXEL_UNITS = 8.0

#: sample()'s documented defaults: the schedule and range the suite uses where a model has no other.
DEFAULT_SCHEDULE, DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX = "karras", 0.002, 80.0


class Perturbed:
    """``D_hat = D + c_out(sigma) level g(c_in x, log sigma)``: an exact denoiser with a network-like error.

    ``g(u, l) = sum_k a_k cos(w_k . u + o_k l + b_k)`` with ``w_k ~ N(0, I)``, ``o_k ~ N(0, 1)``,
    ``b_k ~ U[0, 2 pi)`` and ``a_k ~ N(0, 2/K I)`` (unit RMS per coordinate), drawn from ``seed``.
    ``x`` is ``[B, d]``; ``sigma`` ``[B]``.
    """

    def __init__(self, denoiser, param: Parameterization, dim: int, level: float, *, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        k = 64
        self.denoiser, self.param, self.level = denoiser, param, float(level)
        self.w = torch.randn(k, dim, generator=g, dtype=torch.float64)
        self.o = torch.randn(k, generator=g, dtype=torch.float64)
        self.b = 2 * math.pi * torch.rand(k, generator=g, dtype=torch.float64)
        self.a = torch.randn(k, dim, generator=g, dtype=torch.float64) * math.sqrt(2 / k)

    @staticmethod
    def profile(sigma: Tensor) -> Tensor:
        """The RMS raw-output error over sigma, per unit ``level``: ``0.1 + 1 / (1 + sigma**2)``."""
        return 0.1 + 1 / (1 + sigma**2)

    def error(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The raw-output error ``level profile(sigma) g(c_in x, log sigma)`` ``[B, d]``."""
        _, _, c_in, _ = self.param.scalings(sigma)
        u = append_dims(c_in, x.ndim) * x
        phase = (
            u @ self.w.T.to(x.dtype)
            + sigma.log()[:, None] * self.o.to(x.dtype)
            + self.b.to(x.dtype)
        )
        return (self.level * self.profile(sigma))[:, None] * (torch.cos(phase) @ self.a.to(x.dtype))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        _, c_out, _, _ = self.param.scalings(sigma)
        # |c_out| <= sigma: x0-prediction's c_out = 1 would leave an error at sigma -> 0 and make the
        # drift (x - D) / sigma singular; a network's denoiser error vanishes like sigma there.
        scale = torch.minimum(c_out.abs(), sigma) * c_out.sign()
        return self.denoiser(x, sigma) + append_dims(scale, x.ndim) * self.error(x, sigma)


def _parse(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (registry name, options)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    return name, options


def robust_samplers(names: list[str] | None = None) -> list[str]:
    """Every fixed-NFE sampler of ``REGISTRY`` (adaptive ones choose their own NFE), or ``names``
    (each ``name`` or ``name:key=value,...``, e.g. ``ipndm:variant=equal``; the keys ``schedule``,
    ``sigma_min`` and ``sigma_max`` set the schedule instead of a sampler option)."""
    fixed = [n for n in REGISTRY if n not in ADAPTIVE]
    if names is None:
        return fixed
    unknown = sorted({_parse(n)[0] for n in names} - set(fixed))
    if unknown:
        raise ValueError(f"--robust-samplers: unknown or adaptive {unknown}; allowed: {fixed}")
    return list(names)


def _draw(den, spec: str, nfe: int, z: Tensor, schedule: str, lo: float, hi: float):
    """Samples of sampler ``spec`` from noise ``z`` at the largest NFE <= ``nfe`` it can make, and that NFE."""
    name, options = _parse(spec)
    schedule = options.pop("schedule", schedule)  # a spec may carry its own schedule and range
    # sample()'s default grid (its last point dropped) unless the spec or the model sets sigma_min
    drop = "sigma_min" not in options and lo == DEFAULT_SIGMA_MIN
    lo, hi = options.pop("sigma_min", lo), options.pop("sigma_max", hi)
    n = steps_within(name, options, nfe)
    if n is None:
        return None, 0
    sigmas = torch.tensor(schedule_sigmas(schedule, n, None if drop else lo, hi), dtype=z.dtype)
    try:
        with torch.no_grad():
            out = sample(den, z.shape, sampler=name, sigmas=sigmas, noise=z, dtype=z.dtype, seed=0,
                         **options)  # fmt: skip
    except ValueError as err:  # e.g. restart on 2 main steps: no main sigma to restart from
        print(f"{spec} at NFE {nfe}: cannot run on these sigmas ({err})", flush=True)
        return None, 0
    return out, count_nfe(name, sigmas, **options)


def diverged(row: dict) -> bool:
    """Unbounded samples, or a distance over 10x its floor."""
    return (not row["bounded"]) or not (row["distance"] <= 10 * row["floor"])


# --------------------------------------------------------------------------------------------------
# Part 1: perturbed exact mixtures.


def run_mixtures(samplers, nfes, *, targets=("ring8", "gmm64"), levels=(0.4,), rows=400,
                 seed=0, log=print) -> list[dict]:  # fmt: skip
    """One row per (target, parameterisation, level, sampler, NFE); see the module docstring."""
    out = []
    for tname in targets:
        gm = target(tname)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(rows, gm.dim, generator=g, dtype=torch.float64)
        data = gm.sample(rows, torch.Generator().manual_seed(seed + 1))
        noise_floor = sliced_wasserstein(
            gm.sample(rows, torch.Generator().manual_seed(seed + 2)), data
        )
        for pname, make in PARAMS.items():
            for level in levels:
                den = Perturbed(gm.denoise, make(), gm.dim, level, seed=seed)
                t0 = time.perf_counter()
                ref = pf_ode_reference(den, DEFAULT_SIGMA_MAX * z, DEFAULT_SIGMA_MAX, 0.0,
                                       rtol=1e-7, atol=1e-7)  # fmt: skip
                ref_sw = sliced_wasserstein(ref, data)
                floor = max(noise_floor, ref_sw)
                log(f"{tname} {pname} level {level}: reference {time.perf_counter() - t0:.0f}s, "
                    f"SW2 of the perturbed field's ODE {ref_sw:.3f} (two-sample {noise_floor:.3f})")  # fmt: skip
                for name in samplers:
                    for nfe in nfes:
                        x, made = _draw(den, name, nfe, z, DEFAULT_SCHEDULE,
                                        DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX)  # fmt: skip
                        if x is None:
                            continue
                        ok = bounded(x, data)
                        ode = (
                            (x - ref).square().mean().sqrt()
                            if _parse(name)[0] not in STOCHASTIC
                            else math.nan
                        )
                        out.append({
                            "model": f"{tname}/{pname}/{level:g}", "sampler": name, "target_nfe": nfe,
                            "nfe": made, "ode_error": float(ode) if ok else math.inf,
                            "distance": sliced_wasserstein(x, data) if ok else math.inf,
                            "floor": floor, "ref_distance": ref_sw, "bounded": ok,
                        })  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Part 2: trained networks on the digits.


def nn_accuracy(x: Tensor, y: Tensor) -> float:
    """Leave-one-out 1-NN accuracy of telling ``x`` ``[n, ...]`` from ``y`` ``[n, ...]`` (0.5: alike)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"nn_accuracy needs equal sizes; got {x.shape[0]} and {y.shape[0]}")
    pool = torch.cat([x.flatten(1), y.flatten(1)]).double()
    lab = torch.cat([torch.zeros(len(x)), torch.ones(len(y))])
    d = torch.cdist(pool, pool)
    d.fill_diagonal_(math.inf)
    return float((lab[d.argmin(1)] == lab).double().mean())


def bounded(x: Tensor, data: Tensor) -> bool:
    """Finite, with an RMS at most 10x the data's: a few outlying pixels are a quality matter (FD)."""
    return bool(torch.isfinite(x).all()) and float(x.square().mean()) <= 100 * float(
        data.square().mean()
    )


def _quality(x: Tensor, held: Tensor) -> dict:
    bounded_ = bounded(x, held)
    if not bounded_:
        return {"bounded": False, "nn": math.nan, "distance": math.inf}
    xc = x.clamp(-1, 1)
    m = min(len(xc), len(held))
    return {"bounded": True, "nn": nn_accuracy(xc[:m], held[:m]),
            "distance": PIXEL_UNITS**2 * frechet_distance(xc.flatten(1).double(), held.flatten(1).double())}  # fmt: skip


def _networks(cache: Path, want: list[str], log) -> dict:
    """name -> (denoiser, sigma_min, sigma_max, schedule) for the networks found or trained."""
    from scorekit.bench import digits_unet
    from scorekit.runs import load_run
    from scorekit.train.preview import sampling_range

    nets = {}
    for name in want:
        if name == "ddpm-unet":
            path = digits_unet.train_ddpm_unet(cache / name, minutes=10.0, threads=1)
            den = digits_unet.load_ddpm_unet(path)
            nets[name] = (den, DEFAULT_SIGMA_MIN, default_sigma_max(den))
        elif (cache / name / "config.json").is_file():
            den, info = load_run(cache / name)
            lo, hi = sampling_range(info["process"], info.get("sigma_data", 4.0))
            nets[name] = (den, lo, hi)
        else:
            log(
                f"{name}: no run under {cache} (train it with scorekit train ... --out {cache / name})"
            )
    return nets


def _diffusers_dpmpp(unet_dir: Path, z: Tensor, nfe: int) -> Tensor:
    """diffusers' DPMSolverMultistepScheduler loop (its defaults) on the UNet from noise ``z``."""
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(unet_dir / "unet", low_cpu_mem_usage=False).eval()
    sched = diffusers.DPMSolverMultistepScheduler.from_pretrained(unet_dir / "scheduler")
    sched.set_timesteps(nfe)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def run_networks(samplers, nfes, *, cache: Path, nets=("ddpm-unet", "digits-eps", "digits-edm",
                 "digits-cond"), n=360, seed=0, with_diffusers=True, log=print) -> list[dict]:  # fmt: skip
    """One row per (network, sampler, NFE) and diffusers' DPM-Solver++ on the UNet; see the docstring."""
    from scorekit.bench import digits_unet

    held, train = digits_unet.heldout_digits(), digits_unet.training_digits()
    g = torch.Generator().manual_seed(seed + 7)
    ref = train[torch.randperm(len(train), generator=g)[:n]]
    floor = _quality(ref, held)
    log(f"digits floor (training vs held-out): 1-NN {floor['nn']:.3f}, FD {floor['distance']:.2f}")
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = []
    for net, (den, lo, hi) in _networks(Path(cache), list(nets), log).items():
        if net == "ddpm-unet" and with_diffusers:
            for nfe in nfes:
                q = _quality(_diffusers_dpmpp(Path(cache) / net, z, nfe), held)
                out.append({"model": net, "sampler": "diffusers DPMSolverMultistep", "target_nfe": nfe,
                            "nfe": nfe, "floor": floor["distance"], "nn_floor": floor["nn"], **q})  # fmt: skip
                log(f"{net} diffusers dpm++ {nfe}: 1-NN {q['nn']:.3f} FD {q['distance']:.1f}")
        for name in samplers:
            for nfe in nfes:
                t0 = time.perf_counter()
                x, made = _draw(den, name, nfe, z, DEFAULT_SCHEDULE, lo, hi)
                if x is None:
                    continue
                q = _quality(x, held)
                out.append({"model": net, "sampler": name, "target_nfe": nfe, "nfe": made,
                            "floor": floor["distance"], "nn_floor": floor["nn"], **q})  # fmt: skip
                log(f"{net} {name} {nfe} ({made} calls, {time.perf_counter() - t0:.0f}s): "
                    f"1-NN {q['nn']:.3f} FD {q['distance']:.1f}")  # fmt: skip
    return out


def run_defaults(nfes, *, cache: Path, seeds=(0, 1, 2, 3, 4), n=360, log=print) -> list[dict]:
    """scorekit's defaults against diffusers' on the diffusers-recipe UNet, over several noise draws.

    The UNet is loaded as a user brings a diffusers model, ``scorekit.models.from_diffusers`` with
    its defaults (the scheduler config's x0 clipping; ``sigma_data = 0.5``), and sampled with
    ``scorekit.sample(denoiser, shape, nfe=k, noise=z)`` and nothing else: ``dpmpp_2m`` on karras
    steps from ``min(80, 20 sigma_data) = 10`` to 0.002. diffusers' ``DPMSolverMultistepScheduler``
    (its defaults) runs from the same noise ``z`` (one draw per seed). One row per (seed, sampler, NFE).
    """
    from scorekit.bench import digits_unet
    from scorekit.models import from_diffusers

    path = digits_unet.train_ddpm_unet(Path(cache) / "ddpm-unet", minutes=10.0, threads=1)
    den = from_diffusers(path)
    held, train = digits_unet.heldout_digits(), digits_unet.training_digits()
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed + 7)
        floor = _quality(train[torch.randperm(len(train), generator=g)[:n]], held)
        z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for nfe in nfes:
            for name in ("diffusers DPMSolverMultistep", "scorekit default"):
                if name.startswith("diffusers"):
                    x = _diffusers_dpmpp(path, z, nfe)
                else:
                    with torch.no_grad():
                        x = sample(den, z.shape, nfe=nfe, noise=z)
                q = _quality(x, held)
                out.append({"model": f"ddpm-unet seed {seed}", "sampler": name, "target_nfe": nfe,
                            "nfe": nfe, "floor": floor["distance"], "nn_floor": floor["nn"], **q})  # fmt: skip
                log(f"seed {seed} {name} {nfe}: 1-NN {q['nn']:.3f} FD {q['distance']:.1f}")
    return out


def defaults_verdict(rows: list[dict]) -> list[str]:
    """Is scorekit's default at NFE k at least as good as diffusers' at 2k (1-NN and FD)? Per noise
    draw, then on the means over the draws (a single draw's 1-NN moves by about +-0.025)."""
    by = {(r["model"], r["sampler"].split()[0], r["target_nfe"]): r for r in rows}
    lines, pairs = [], {}
    for (model, who, k), r in sorted(by.items()):
        theirs = by.get((model, "diffusers", 2 * k))
        if who != "scorekit" or theirs is None:
            continue
        pairs.setdefault(k, []).append((r, theirs))
        ok = r["nn"] <= theirs["nn"] and r["distance"] <= theirs["distance"]
        lines.append(f"{model}: scorekit@{k} {r['nn']:.3f} / {r['distance']:.1f} vs diffusers@{2 * k} "
                     f"{theirs['nn']:.3f} / {theirs['distance']:.1f}: {'yes' if ok else 'no'}")  # fmt: skip
    for k, ps in sorted(pairs.items()):
        m = [sum(p[j][key] for p in ps) / len(ps) for j in (0, 1) for key in ("nn", "distance")]
        ok = m[0] <= m[2] and m[1] <= m[3]
        lines.append(f"mean of {len(ps)} draws: scorekit@{k} {m[0]:.3f} / {m[1]:.1f} vs diffusers@{2 * k} "
                     f"{m[2]:.3f} / {m[3]:.1f}: {'yes' if ok else 'no'}")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------------
# Report.


def _fmt(v: float, digits: int) -> str:
    return "inf" if v == math.inf else ("nan" if v != v else f"{v:.{digits}f}")


def table(rows: list[dict], nfes, value: Callable[[dict], str]) -> str:
    """A markdown table: one line per (model, sampler), one column per target NFE; ``!`` = diverged."""
    keys = sorted({(r["model"], r["sampler"]) for r in rows}, key=lambda k: (k[0], k[1]))
    by = {(r["model"], r["sampler"], r["target_nfe"]): r for r in rows}
    lines = ["| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "| --- | --- |" + " --- |" * len(nfes)]  # fmt: skip
    for model, name in keys:
        cells = []
        for n in nfes:
            r = by.get((model, name, n))
            cells.append("-" if r is None else value(r) + (" !" if diverged(r) else ""))
        lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def divergences(rows: list[dict]) -> list[str]:
    """``model sampler NFE`` where a sampler diverges and euler, on the same model and NFE, does not."""
    euler = {(r["model"], r["target_nfe"]): diverged(r) for r in rows if r["sampler"] == "euler"}
    return [f"{r['model']} {r['sampler']} {r['target_nfe']}" for r in rows
            if diverged(r) and not euler.get((r["model"], r["target_nfe"]), True)]  # fmt: skip


def run_robust(out: Path, *, samplers=None, nfes=(5, 10, 20), cache=Path("bench_out/robust_cache"),
               parts=("mixtures", "networks"), rows=400, n=360, nets=None, seed=0) -> dict:  # fmt: skip
    """Run the suite; write ``robust.json`` and ``robust.md`` into ``out``; return the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = robust_samplers(samplers)
    t0 = time.perf_counter()
    result: dict = {"samplers": names, "nfe": list(nfes), "seed": seed}
    text = []
    if "mixtures" in parts:
        mix = run_mixtures(names, nfes, rows=rows, seed=seed, log=_log)
        result["mixtures"] = mix
        text += ["## Perturbed exact mixtures: RMS error to the perturbed field's exact ODE / sliced W2 to "
                 "the data (floor in results; ! = diverged)", "",
                 table(mix, nfes, lambda r: f"{_fmt(r['ode_error'], 3)} / {_fmt(r['distance'], 3)}"), ""]  # fmt: skip
    if "networks" in parts:
        kw = {} if nets is None else {"nets": nets}
        net = run_networks(names, nfes, cache=Path(cache), n=n, seed=seed, log=_log, **kw)
        result["networks"] = net
        text += ["## Trained digits networks: 1-NN two-sample accuracy / FD on pixels vs held-out "
                 "(! = diverged)", "",
                 table(net, nfes, lambda r: f"{_fmt(r['nn'], 3)} / {_fmt(r['distance'], 1)}"), ""]  # fmt: skip
    if "defaults" in parts:
        rows = run_defaults(nfes, cache=Path(cache), n=n, log=_log)
        result["defaults"] = rows
        result["defaults_verdict"] = defaults_verdict(rows)
        text += ["## Defaults on the diffusers-recipe UNet: 1-NN / FD, one row per noise draw", "",
                 table(rows, nfes, lambda r: f"{_fmt(r['nn'], 3)} / {_fmt(r['distance'], 1)}"), "",
                 "scorekit's default at k calls against diffusers' at 2k:", "",
                 *[f"- {v}" for v in result["defaults_verdict"]], ""]  # fmt: skip
    result["divergent_where_euler_is_not"] = divergences(
        result.get("mixtures", []) + result.get("networks", [])
    )
    result["seconds"] = time.perf_counter() - t0
    text += [
        "Diverging where euler does not: "
        + (", ".join(result["divergent_where_euler_is_not"]) or "none")
    ]
    atomic_write_json(out / "robust.json", result)
    atomic_write(out / "robust.md", ("\n".join(text) + "\n").encode())
    print("\n".join(text), flush=True)
    return result


def _log(msg: str) -> None:
    print(msg, flush=True)


def add_arguments(parser) -> None:
    """The ``--robust-*`` options of ``scorekit bench samplers --suite robust``."""
    a = parser.add_argument
    a("--robust-parts", nargs="+", default=["mixtures", "networks"],
      choices=["mixtures", "networks", "defaults"],
      help="--suite robust: which parts (default mixtures and networks; defaults: scorekit.sample's "
      "defaults against diffusers on the UNet over noise seeds 0-4)")  # fmt: skip
    a("--robust-samplers", nargs="+", default=None,
      help="--suite robust: samplers, name or name:key=value (default every fixed-NFE one)")  # fmt: skip
    a("--robust-nets", nargs="+", default=None,
      help="--suite robust: networks under --robust-cache (default ddpm-unet digits-eps digits-edm "
      "digits-cond; ddpm-unet is trained there if absent, 10 CPU-minutes)")  # fmt: skip
    a(
        "--robust-cache",
        default="bench_out/robust_cache",
        help="--suite robust: where the networks live",
    )
    a("--robust-rows", type=int, default=400, help="--suite robust: rows per perturbed mixture")
    a("--robust-samples", type=int, default=360, help="--suite robust: samples per network")


def run(args) -> int:
    """``scorekit bench samplers --suite robust``: ``run_robust`` into ``<out>/robust``."""
    run_robust(Path(args.out) / "robust", samplers=args.robust_samplers, nfes=tuple(args.nfe),
               cache=Path(args.robust_cache), parts=tuple(args.robust_parts), rows=args.robust_rows,
               n=args.robust_samples, nets=args.robust_nets, seed=args.seed)  # fmt: skip
    return 0


def load_results(path: str | Path) -> dict:
    """Read a ``robust.json`` written by ``run_robust``."""
    return json.loads(Path(path).read_text())
