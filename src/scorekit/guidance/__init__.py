"""Guidance: denoisers built from denoisers, and sampler-level rules that steer towards a condition.

Two kinds of rule (DESIGN.md, STYLE 5):

* A rule that only changes the denoiser's output **returns a denoiser** ``D(x [B, ...], sigma [B])``
  built from denoisers with the condition already bound (``cond``, ``uncond``); it works with every
  sampler in ``scorekit.samplers.REGISTRY`` unchanged. Rules with state across calls (``apg``'s
  momentum, ``adaptive_guidance``'s finished rows) keep it in the closure: build a new one for each
  sampling call.
* A rule that changes the update itself is a function with the sampler signature
  ``name(cond, uncond, x, sigmas, *, scale, generator=None, callback=None, progress=False, ...) -> x``.

Cost is counted in **network evaluations** (calls of ``cond``, ``uncond`` or another model), per
call of the returned denoiser; a sampler making ``n`` denoiser calls costs ``n`` times that.
``N = len(sigmas) - 1``.

======================  ============================================  ===============================
rule                    what                                          network evaluations
======================  ============================================  ===============================
cfg                     ``D_u + w (D_c - D_u)``, rescale, interval    2 per call; 1 outside interval
autoguidance            cfg with a weaker model of the same cond      2 per call (1 weak)
dynamic_threshold       clamp the output at a per-row percentile      the wrapped denoiser's
apg                     parallel/orthogonal split, r, momentum        2 per call
tcfg                    unconditional eps projected on top SV         2 per call
adaptive_guidance       stop uncond when cos(eps_c, eps_u) is back    2 per call, then 1 (counted)
                        above t after dipping below it; frame="x0":
                        at the first cos(D_c, D_u) >= t
classifier_guidance     ``D_u + w sigma^2 grad log p(y | x)``         1 + classifier fwd/bwd per call
cads                    annealed noise on the condition embedding     1 per call
density_guidance        ``D + r sigma^2 (D - x) / |D - x|^2``: r      1 per call
                        more nats of log-density per unit -log sigma
reward_guidance         ``D + w sigma^2 grad_x r(D(x, sigma))``       1 + a backward pass per call
minority_guidance       climb |D(x) - D(D(x) + s z, s)|^2             2 + a backward pass per call
minority_score          per data point |D(x0 + s z, s) - x0|^2,       K per point (K noise draws)
                        cut by minority_levels into L quantile
                        levels: the labels of a trained minority
                        classifier (classifier_guidance to L - 1)
eps_scaling             exposure bias: eps / lambda(sigma)            the wrapped denoiser's
time_shift              exposure bias: D at the sample's own sigma    the wrapped denoiser's
fk_smc (sampler)        FK-weighted SMC on the tilted target, C       2 N + 2 C (N - 1)
                        resample-move Langevin steps per level
fk_product (sampler)    FK SMC for prod_k p_k^beta_k (experts, p^b)   K N + K C (N - 1)
cfg_pc (sampler)        DDIM(cond) + C Langevin on tilted density     (N - 1)(1 + 2C) + 2
svdd (sampler)          M DDPM candidates per step, kept by value     1 + M (N - 1)
======================  ============================================  ===============================

Trained guidance lives with training: ``scorekit.train.classifier`` (a noise-conditional classifier
for ``classifier_guidance``, with the DLSM loss) and ``scorekit.train.loss.guidance_free_loss``
(``scorekit train --guidance-free S``: the network learns the CFG denoiser of scale ``S``).

The exact ground truth these are tested against is in ``scorekit.guidance.exact``:
``ClassMixture`` (exact conditional and unconditional denoisers, the exact noisy classifier and
exact samples of the tilted target ``p(x|y)^w p(x)^(1-w)``) and ``class_target(name)``.
"""

from __future__ import annotations

from scorekit.guidance.adaptive import adaptive_guidance
from scorekit.guidance.cads import cads
from scorekit.guidance.cfg import autoguidance, cfg, dynamic_threshold
from scorekit.guidance.classifier import classifier_guidance
from scorekit.guidance.density import density_guidance
from scorekit.guidance.exact import ClassMixture, class_target
from scorekit.guidance.exposure import eps_scaling, time_shift
from scorekit.guidance.minority import minority_guidance, minority_levels, minority_score
from scorekit.guidance.pc import cfg_pc
from scorekit.guidance.projected import apg, tcfg
from scorekit.guidance.reward import reward_guidance
from scorekit.guidance.smc import effective_sample_size, fk_product, fk_smc, systematic_resample
from scorekit.guidance.svdd import svdd

__all__ = [
    "ClassMixture",
    "adaptive_guidance",
    "apg",
    "autoguidance",
    "cads",
    "cfg",
    "cfg_pc",
    "class_target",
    "classifier_guidance",
    "density_guidance",
    "dynamic_threshold",
    "effective_sample_size",
    "eps_scaling",
    "fk_product",
    "fk_smc",
    "minority_guidance",
    "minority_levels",
    "minority_score",
    "reward_guidance",
    "svdd",
    "systematic_resample",
    "tcfg",
    "time_shift",
]
