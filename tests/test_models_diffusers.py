"""``scorekit.models.from_diffusers`` against diffusers itself: tiny random models saved with
``save_pretrained``, every value recomputed here by hand from the model's output and the scheduler's
own ``alphas_cumprod`` / ``sigmas`` / preconditioning, in float64.

The model is spied on (a forward hook records its input, timestep and output), so one call per
training timestep checks both what scorekit feeds the model (``x_t = sqrt(abar_i) x`` at timestep
``i``) and what it makes of the output.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers
from diffusers import UNet2DConditionModel, UNet2DModel

from scorekit.models import bind, from_diffusers, map_config, schedule_sigmas
from scorekit.models.config import alphas_cumprod
from scorekit.samplers import REGISTRY

pytestmark = pytest.mark.peer

UNET = {
    "sample_size": 4,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 2,
    "add_attention": False,
}


def _save(folder, model, scheduler):
    folder.mkdir()
    model.save_pretrained(folder)
    scheduler.save_config(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, diffusers scheduler) of tiny random models, one per scheduler family."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    specs = {
        # eps on DDPM's linear table (DDPMScheduler's default clip_sample=True kept in the config)
        "eps": (UNET, diffusers.DDPMScheduler(prediction_type="epsilon")),
        # v on latent diffusion's table, rescaled to zero terminal SNR (Euler keeps abar_T = 2^-24)
        "v": (UNET, diffusers.EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="v_prediction", rescale_betas_zero_snr=True)),
        # x0-prediction, cosine table, class-conditional
        "x0_cond": ({**UNET, "num_class_embeds": 3}, diffusers.DDIMScheduler(
            beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)),
        "flow": (UNET, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
        "edm": (UNET, diffusers.EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction")),
    }  # fmt: skip
    for name, (cfg, sched) in specs.items():
        out[name] = (_save(root / name, UNet2DModel(**cfg), sched), sched)
    return out


def _spy(den):
    """Record the model's (input, timestep, output) of every call."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].detach(), args[1].detach(), kwargs, output[0].detach()))

    den.model.register_forward_hook(hook, with_kwargs=True)
    return calls


def _load64(folder, **kw):
    den = from_diffusers(folder, **kw)
    den.model.double()
    return den


def _col(v):
    return v.view(-1, 1, 1, 1)


def _table(sched):
    ac = sched.alphas_cumprod.double()
    return ac, ((1 - ac) / ac).sqrt()


@pytest.mark.parametrize("name", ["eps", "v", "x0_cond"])
def test_ddpm_table_models_equal_the_hand_formula_at_every_training_timestep(saved, name):
    folder, sched = saved[name]
    den = _load64(folder, clip_sample=False)
    calls = _spy(den)
    ac, sig = _table(sched)
    n = len(ac)
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = {"class_labels": torch.arange(n) % 3} if name == "x0_cond" else {}
    with torch.no_grad():
        ours = den(x, sig, **cond)
    (inp, t, kwargs, out) = calls[0]
    # The model sees its own frame and its own integer timesteps.
    torch.testing.assert_close(t.double(), torch.arange(n, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(inp, x * _col(ac.sqrt()), rtol=1e-12, atol=1e-12)
    if cond:
        assert torch.equal(kwargs["class_labels"], cond["class_labels"])
    xt, a, s = inp, _col(ac.sqrt()), _col((1 - ac).sqrt())
    if name == "eps":  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        hand = (xt - s * out) / a
    elif name == "v":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v  (Salimans & Ho 2022)
        hand = a * xt - s * out
    else:
        hand = out
    torch.testing.assert_close(ours, hand, rtol=1e-9, atol=1e-9)
    assert den.sigma_min == pytest.approx(float(sig[0]), rel=1e-12)
    assert den.sigma_max == pytest.approx(float(sig[-1]), rel=1e-12)


def test_flow_model_equals_the_hand_formula_on_the_scheduler_table(saved):
    folder, sched = saved["flow"]
    den = _load64(folder)
    calls = _spy(den)
    t = sched.sigmas[1:].double()  # the training table without t = 1 (infinite sigma)
    x = torch.randn(
        len(t), 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    with torch.no_grad():
        ours = den(x, t / (1 - t))
    inp, ts, _, v = calls[0]
    torch.testing.assert_close(ts.double(), sched.timesteps[1:].double(), rtol=1e-6, atol=1e-4)
    xt = _col(1 - t) * x  # x_t = (1 - t) x0 + t noise is (1 - t) times the sigma-frame x
    torch.testing.assert_close(inp, xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, xt - _col(t) * v, rtol=1e-9, atol=1e-9)  # v = noise - x0
    assert den.sigma_min == pytest.approx(float(t[-1] / (1 - t[-1])), rel=1e-5)


def test_edm_model_equals_the_scheduler_preconditioning(saved):
    folder, sched = saved["edm"]
    den = _load64(folder)
    calls = _spy(den)
    sig = torch.tensor([0.002, 0.05, 0.7, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ours = den(x, sig)
    inp, t, _, out = calls[0]
    torch.testing.assert_close(inp, sched.precondition_inputs(x, _col(sig)))
    torch.testing.assert_close(t.double(), sched.precondition_noise(sig), rtol=1e-6, atol=1e-7)
    hand = sched.precondition_outputs(x, out, _col(sig))
    torch.testing.assert_close(ours, hand, rtol=1e-12, atol=1e-12)


def test_clip_sample_is_diffusers_default_and_thresholding_is_imagens(saved):
    folder, sched = saved["eps"]
    _ac, sig = _table(sched)
    x = 3 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    idx = torch.tensor([5, 100, 500, 900])
    plain = _load64(folder, clip_sample=False)
    clipped = _load64(folder)  # DDPMScheduler's clip_sample=True, range 1, from its config
    assert clipped.clip_sample and not plain.clip_sample
    dyn = _load64(folder, thresholding=True)
    with torch.no_grad():
        d = plain(x, sig[idx])
        torch.testing.assert_close(clipped(x, sig[idx]), d.clamp(-1, 1))
        s = diffusers.DDPMScheduler(thresholding=True, sample_max_value=1.0)
        torch.testing.assert_close(dyn(x, sig[idx]), s._threshold_sample(d))
    assert (d.abs() > 1).any()  # the clamp changed something


def test_class_conditional_labels_matter(saved):
    den = _load64(saved["x0_cond"][0])
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sig = torch.full((3,), 1.0, dtype=torch.float64)
    with torch.no_grad():
        a = bind(den, class_labels=torch.tensor([0, 1, 2]))(x, sig)
        b = bind(den, class_labels=torch.tensor([2, 2, 2]))(x, sig)
    assert torch.equal(a[2], b[2]) and not torch.allclose(a[0], b[0])


def test_cross_attention_unet_binds_one_prompt_for_the_batch(tmp_path):
    torch.manual_seed(5)
    model = UNet2DConditionModel(
        sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=2,
        cross_attention_dim=6, attention_head_dim=2, mid_block_type=None,
    )  # fmt: skip
    folder = tmp_path / "pipe"
    model.save_pretrained(folder / "unet")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False)  # fmt: skip
    sched.save_config(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    den = _load64(folder, subfolder="unet")
    ac, sig = _table(sched)
    prompt = torch.randn(1, 5, 6, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 400, 990])
    with torch.no_grad():
        ours = bind(den, encoder_hidden_states=prompt)(x, sig[t])
        xt = x * _col(ac[t].sqrt())
        eps = den.model(xt, t, encoder_hidden_states=prompt.expand(3, 5, 6)).sample
    hand = (xt - _col((1 - ac[t]).sqrt()) * eps) / _col(ac[t].sqrt())
    torch.testing.assert_close(ours, hand, rtol=1e-9, atol=1e-9)


# ---- the scheduler config mapping, table by table (no model) ----


@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid"},
        {"beta_schedule": "laplace"},
        {"trained_betas": torch.linspace(1e-4, 0.03, 50).tolist(), "num_train_timesteps": 50},
        {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "num_train_timesteps": 100},
    ],
    ids=["linear", "scaled_linear", "cosine", "sigmoid", "laplace", "trained", "zero_snr"],
)
def test_tables_are_diffusers_tables(config):
    ours = alphas_cumprod(config)
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()
    if config.get("rescale_betas_zero_snr"):
        assert theirs[-1] < 1e-12 and ours[-1] == 2**-24  # diffusers' Euler/DDIM replacement
        ours, theirs = ours[:-1], theirs[:-1]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_timestep_spacing_gives_ddims_sigmas(spacing, steps):
    cfg = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    sched = diffusers.DDIMScheduler(**cfg)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    expect = ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt()
    ours = schedule_sigmas(cfg, map_config(cfg), steps)
    torch.testing.assert_close(ours[:-1], expect, rtol=1e-12, atol=0)
    assert ours[-1] == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_gives_flowmatch_eulers_sigmas(shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", **sched.config}
    t = sched.sigmas[1:-1].double()  # skip t = 1 (infinite sigma; scorekit starts one step short)
    ours = schedule_sigmas(cfg, map_config(cfg), 12)
    torch.testing.assert_close(ours[1:-1], t / (1 - t), rtol=1e-6, atol=0)
    assert ours[0] == pytest.approx(999.0) and ours[-1] == 0


# ---- sampling parity: the same algorithm, the same sigmas and noise, step by step ----


def _steps(fn):
    """A scorekit sampler's state after each step: its callback's states (at ``sigma_i``, before
    step ``i``) from the second on, then its result."""
    states = []
    final = fn(lambda d: states.append(d["x"].clone()))
    return [*states[1:], final]


def test_euler_is_ddim_step_by_step(saved):
    folder, _ = saved["eps"]
    den = _load64(folder, clip_sample=False)
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(8)
    # the same table values in float64, so that diffusers' arithmetic runs in float64 too
    ac = sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sig = ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt()
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    theirs, sample = [], z * (1 - ac[sched.timesteps[0]]).sqrt()  # x_T = s x, x = sigma z
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = den.model(sample, t).sample
            sample = sched.step(eps, t, sample).prev_sample
            nxt = float(sigmas[i + 1])
            theirs.append(sample * math.sqrt(1 + nxt**2))  # back to the sigma frame
        ours = _steps(lambda cb: REGISTRY["euler"](den, sigmas[0] * z, sigmas, callback=cb))
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dpmpp_2m_is_dpm_solver_multistep_step_by_step(saved):
    from scorekit.bench.samplers.diffusers_harness import _Float64Sample

    folder, _ = saved["v"]  # v-prediction, zero-SNR table: the adapter and the solver at once
    den = _load64(folder)
    cfg = dict(saved["v"][1].config)
    for k in ("_class_name", "_diffusers_version", "interpolation_type", "use_karras_sigmas",
              "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type"):  # fmt: skip
        cfg.pop(k, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.DPMSolverMultistepScheduler.from_config(
            {**cfg, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
             "final_sigmas_type": "zero", "timestep_spacing": "trailing"})  # fmt: skip
    sched.set_timesteps(8)
    _ac, table = _table(sched)
    sigmas = torch.cat([table[sched.timesteps], table.new_zeros(1)])
    sched.sigmas = sigmas.clone()  # the float64 table values at its own integer timesteps
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sample = (z * sigmas[0] / (1 + sigmas[0] ** 2).sqrt()).as_subclass(_Float64Sample)
    theirs = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = den.model(sample.as_subclass(torch.Tensor), t).sample
            sample = sched.step(out, t, sample).prev_sample
            theirs.append(sample.as_subclass(torch.Tensor) * (1 + sigmas[i + 1] ** 2).sqrt())
        ours = _steps(lambda cb: REGISTRY["dpmpp_2m"](den, sigmas[0] * z, sigmas, callback=cb))
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_euler_is_flowmatch_euler_step_by_step(saved):
    folder, _ = saved["flow"]
    den = _load64(folder)
    t = torch.tensor([0.95, 0.8, 0.6, 0.4, 0.2, 0.05], dtype=torch.float64)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=t.tolist())
    sched.sigmas = torch.cat([t, t.new_zeros(1)])
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sample, theirs = t[0] * z, []  # x_t = t noise at the start (x0 part dropped in both)
    sigmas = torch.cat([t / (1 - t), t.new_zeros(1)])
    x_start = z * sigmas[0]
    sample = x_start * (1 - t[0])
    with torch.no_grad():
        for i, ts in enumerate(t * 1000):
            v = den.model(sample, ts.reshape(1)).sample
            sample = sample + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
            theirs.append(sample / (1 - sched.sigmas[i + 1]))
        ours = _steps(lambda cb: REGISTRY["euler"](den, x_start, sigmas, callback=cb))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---- a k-diffusion-style model is already a denoiser ----


class KarrasWrapper:
    """``model(x, sigma, **extra) -> denoised``, written here as k-diffusion wraps an eps UNet."""

    def __init__(self, unet, alphas_cumprod):
        self.unet, self.log_sigmas = unet, (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).log()

    def __call__(self, x, sigma, **extra):
        ls = sigma.log()
        i = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.log_sigmas) - 1)
        w = (ls - self.log_sigmas[i - 1]) / (self.log_sigmas[i] - self.log_sigmas[i - 1])
        t = (i - 1) + w
        c_in = _col(1 / (1 + sigma**2).sqrt())
        return x - _col(sigma) * self.unet(c_in * x, t, **extra).sample


def test_a_kdiffusion_style_callable_samples_like_from_diffusers(saved):
    import scorekit

    folder, sched = saved["eps"]
    den = _load64(folder, clip_sample=False)
    wrapper = KarrasWrapper(den.model, sched.alphas_cumprod.double())
    kw = {"nfe": 6, "sampler": "dpmpp_2m", "sigma_min": den.sigma_min, "sigma_max": den.sigma_max,
          "seed": 3, "dtype": torch.float64}  # fmt: skip
    with torch.no_grad():
        a = scorekit.sample(wrapper, (3, 1, 4, 4), **kw)
        b = scorekit.sample(den, (3, 1, 4, 4), **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---- precision, errors ----


def test_half_precision_returns_float32(saved):
    folder, _sched = saved["eps"]
    d32 = from_diffusers(folder, clip_sample=False)
    d16 = from_diffusers(folder, clip_sample=False, dtype=torch.bfloat16)
    x = torch.randn(2, 1, 4, 4)
    sig = torch.tensor([0.5, 5.0])
    with torch.no_grad():
        a, b = d32(x, sig), d16(x, sig)
    assert next(d16.model.parameters()).dtype == torch.bfloat16 and b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_bad_inputs_get_one_line_errors(saved, tmp_path):
    folder, _ = saved["eps"]
    with pytest.raises(FileNotFoundError, match=r"no model config\.json"):
        from_diffusers(tmp_path)
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
        from_diffusers(folder, scheduler={"prediction_type": "eps"})
    with pytest.raises(ValueError, match=r"unknown beta_schedule .quadratic.*scaled_linear"):
        from_diffusers(folder, scheduler={"beta_schedule": "quadratic"})
    no_sched = tmp_path / "nosched"
    UNet2DModel(**UNET).save_pretrained(no_sched)
    with pytest.raises(FileNotFoundError, match=r"no scheduler_config\.json"):
        from_diffusers(no_sched)
    pickled = tmp_path / "pickled"
    model = UNet2DModel(**UNET)
    model.save_pretrained(pickled, safe_serialization=False)
    diffusers.DDPMScheduler().save_config(pickled)
    with pytest.raises(ValueError, match=r"pickle checkpoint.*allow_pickle=True") as e:
        from_diffusers(pickled)
    assert "\n" not in str(e.value)
    den = from_diffusers(pickled, allow_pickle=True, clip_sample=False)
    assert torch.equal(den.model.conv_in.weight, model.conv_in.weight)


def test_missing_diffusers_is_one_line(monkeypatch, saved):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'scorekit\[diffusers\]'"):
        from_diffusers(saved["eps"][0])


def test_bind_expands_batch_one_conditioning_inside_dicts():
    seen = {}

    def spy(x, sigma, **cond):
        seen.update(cond)
        return x

    text = torch.randn(1, 5, 6)
    extra = {"text_embeds": torch.randn(1, 7), "time_ids": torch.randn(3, 6)}
    bind(spy, encoder_hidden_states=text, added_cond_kwargs=extra)(torch.zeros(3, 2), torch.ones(3))
    assert seen["encoder_hidden_states"].shape == (3, 5, 6)
    assert torch.equal(seen["encoder_hidden_states"][2], text[0])
    assert seen["added_cond_kwargs"]["text_embeds"].shape == (3, 7)
    assert seen["added_cond_kwargs"]["time_ids"] is extra["time_ids"]  # already the batch's size


def test_rounded_timesteps_for_integer_only_models(saved):
    folder, sched = saved["eps"]
    den = _load64(folder, clip_sample=False, timesteps="round")
    calls = _spy(den)
    _, sig = _table(sched)

    def between(i, w):  # w of the way from step i to i + 1 in log sigma: t = i + w
        return torch.exp(torch.lerp(sig[i].log(), sig[i + 1].log(), w))

    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        den(x, torch.stack([sig[7], between(100, 0.3), between(100, 0.7), sig[640]]))
    assert calls[0][1].tolist() == [7.0, 100.0, 101.0, 640.0]
