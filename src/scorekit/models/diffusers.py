"""A diffusers model (UNet or transformer) and its scheduler config as a scorekit denoiser.

    from scorekit.models import from_diffusers
    d = from_diffusers("path/to/pipeline", subfolder="unet")      # or a save_pretrained model folder
    x = scorekit.sample(d, (16, *d.sample_shape), nfe=10, sampler="dpmpp_2m",
                        sigma_min=d.sigma_min, sigma_max=d.sigma_max)

The model sees what it saw in training: ``x_t = c_in(sigma) x`` and its own timestep. For a DDPM table
the timestep is the process's ``t(sigma)`` on the table, interpolated linearly in ``log sigma``
between integer steps, so every sigma in ``[sigma_min, sigma_max]`` has a timestep; diffusers'
UNets and transformers embed a float timestep (a sinusoidal embedding), so fractional timesteps are
passed as they are. For a model that only takes integer timesteps, ``timesteps="round"`` rounds to
the nearest table step (the model then sees a slightly different noise level than ``x`` has, by at
most half a step; on sigmas taken from the table it is exact). The output is mapped to
``D(x, sigma)`` by the adapter of the scheduler's ``prediction_type`` (``scorekit.models.config``).

Nothing is downloaded and no code from the folder is run: the model class is looked up by the
``_class_name`` of its ``config.json`` among diffusers' own model classes only, and its weights are
safetensors. Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) can execute code when loaded
and are refused unless ``allow_pickle=True``.

diffusers is optional (``pip install 'scorekit[diffusers]'``) and imported only by ``from_diffusers``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scorekit._util import append_dims, as_sigma
from scorekit.models.config import Mapping, map_config, schedule_sigmas

__all__ = ["MISSING", "DiffusersDenoiser", "bind", "from_diffusers", "require_diffusers"]

#: The one line shown when diffusers is not installed.
MISSING = "loading a diffusers model needs diffusers: pip install 'scorekit[diffusers]'"

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHTS = "diffusion_pytorch_model"


def require_diffusers():
    """The ``diffusers`` module, or ModuleNotFoundError with the one-line install hint."""
    try:
        return importlib.import_module("diffusers")
    except ImportError:
        raise ModuleNotFoundError(MISSING, name="diffusers") from None


class DiffusersDenoiser(nn.Module):
    """``D(x, sigma, **cond)`` of a diffusers model: the denoiser contract of DESIGN.md.

    ``cond`` goes to the model as keyword arguments (``class_labels``, ``encoder_hidden_states``,
    ``added_cond_kwargs``, ``pooled_projections``...); ``bind`` fixes it. The model runs in its own
    dtype (e.g. float16); the scalings and the result are in ``x``'s dtype (float32 for float32 input),
    in the sigma frame. A model with a learned variance (twice the input channels) is read as its
    first half, the mean prediction, as diffusers' DDIM and DPM-Solver do.

    Attributes:
        model: the diffusers module. mapping: ``scorekit.models.config.Mapping`` (process, adapter).
        sigma_min, sigma_max: the trained noise range (table ends), for schedules and likelihoods.
        sample_shape: one example's shape from the model config (``[C, H, W]``), if it says.
        sigma_data: 0.5, the RMS scale of images in [-1, 1] that diffusers' pixel models are trained
            on (``scorekit.sample`` starts at ``20 sigma_data = 10``; set it for other data).
        scheduler_config: the scheduler config dict used.
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value:
            the x0 clipping options (see ``from_diffusers``).
    """

    def __init__(self, model: nn.Module, mapping: Mapping, scheduler_config: dict[str, Any], *,
                 timesteps: str = "fractional", clip: dict[str, Any] | None = None):  # fmt: skip
        super().__init__()
        if timesteps not in ("fractional", "round"):
            raise ValueError(f"timesteps must be 'fractional' or 'round', got {timesteps!r}")
        self.model = model
        self.mapping = mapping
        self.scheduler_config = dict(scheduler_config)
        self.timesteps = timesteps
        opts = {k: getattr(mapping, k) for k in _CLIP_KEYS}
        opts.update(clip or {})
        for k in _CLIP_KEYS:
            setattr(self, k, type(getattr(mapping, k))(opts[k]))
        self.sigma_min = float(mapping.process.sigma_min)
        self.sigma_max = float(mapping.process.sigma_max)
        self.sigma_data = 0.5
        cfg = getattr(model, "config", {}) or {}
        size, chans = cfg.get("sample_size"), cfg.get("in_channels")
        if isinstance(size, int):
            size = [size, size]
        self.sample_shape = [int(chans), *map(int, size)] if size and chans else None

    def forward(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        sigma = as_sigma(sigma, x)
        # Scalings in float64 where the device has it: t(sigma) on a 1000-step table needs the digits.
        work = torch.float32 if x.device.type == "mps" else torch.float64
        c_skip, c_out, c_in, c_noise = self.mapping.param.scalings(sigma.to(work))
        t = c_noise * self.mapping.timestep_scale
        if self.timesteps == "round":
            t = t.round()
        mdtype = next(self.model.parameters()).dtype
        inp = (append_dims(c_in.to(x.dtype), x.ndim) * x).to(mdtype)
        raw = self.model(inp, t.to(torch.float64 if mdtype == torch.float64 else torch.float32),
                         **cond, return_dict=False)[0]  # fmt: skip
        if raw.shape != x.shape and raw.shape[1] == 2 * x.shape[1]:
            raw = raw[:, : x.shape[1]]  # learned variance: keep the mean prediction
        if raw.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(raw.shape)}, expected {tuple(x.shape)}"
            )
        d = append_dims(c_skip.to(x.dtype), x.ndim) * x + append_dims(
            c_out.to(x.dtype), x.ndim
        ) * raw.to(x.dtype)
        if self.thresholding:
            return _dynamic_threshold(d, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return d.clamp(-self.clip_sample_range, self.clip_sample_range)
        return d

    def schedule(self, n_steps: int) -> Tensor:
        """The sigmas ``[n_steps + 1]`` the scheduler config would step on (its spacing or shift)."""
        return schedule_sigmas(self.scheduler_config, self.mapping, n_steps)

    def as_run(self, *, null_label: int | None = None, name: str = "diffusers"):
        """``(denoiser, info)`` shaped like ``scorekit.runs.load_run``'s, for the command line.

        ``info``: image data in [-1, 1] (diffusers' convention) shown as pixels 0..255
        (``normalization`` shift = scale = 127.5), ``sigma_data`` 0.5, ``process`` the table's
        ``Process``, ``num_classes`` the model's class embeddings. scorekit asks for the unconditional
        branch with label -1; a diffusers model has no such label, so ``null_label`` (the class id the
        model was trained with as "no class") replaces it, and without one it is a one-line error.
        """
        if self.sample_shape is None:
            raise ValueError(
                "the model config has no sample_size / in_channels; cannot size samples"
            )
        cfg = getattr(self.model, "config", {}) or {}
        info = {
            "name": name,
            "kind": "image",
            "shape": list(self.sample_shape),
            "num_classes": int(cfg.get("num_class_embeds") or 0),
            "normalization": {"layout": "NCHW", "shift": [127.5], "scale": [127.5]},
            "sigma_data": self.sigma_data,
            "process": self.mapping.process,
            "param": self.mapping.prediction_type,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "step": None,
            "config": {},
        }
        return _NullLabel(self, null_label, info["num_classes"]), info

    def extra_repr(self) -> str:
        return (f"kind={self.mapping.kind}, prediction={self.mapping.prediction_type}, "
                f"sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}], clip_sample={self.clip_sample}, "
                f"thresholding={self.thresholding}, timesteps={self.timesteps}")  # fmt: skip


class _NullLabel(nn.Module):
    """A denoiser whose label -1 (scorekit's "no class") becomes the model's own null class id."""

    def __init__(self, denoiser: nn.Module, null_label: int | None, num_classes: int):
        super().__init__()
        self.denoiser, self.null_label, self.num_classes = denoiser, null_label, num_classes
        self.sigma_data = getattr(denoiser, "sigma_data", None)

    def forward(
        self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **cond
    ) -> Tensor:
        if class_labels is None and self.num_classes:
            class_labels = torch.full((x.shape[0],), -1, device=x.device)  # no label given
        if class_labels is None:
            return self.denoiser(x, sigma, **cond)
        drop = class_labels < 0
        if bool(drop.any()):
            if self.null_label is None:
                raise ValueError(
                    f"this diffusers model is class-conditional ({self.num_classes} class embeddings) "
                    "and has no label -1 for its unconditional branch (used without --label and by "
                    "guidance): give --label, or --null-label K (its 'no class' id)"
                )
            class_labels = torch.where(
                drop, torch.full_like(class_labels, self.null_label), class_labels
            )
        return self.denoiser(x, sigma, class_labels=class_labels, **cond)


_CLIP_KEYS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
              "sample_max_value")  # fmt: skip


def _dynamic_threshold(d: Tensor, ratio: float, max_value: float) -> Tensor:
    """Saharia et al. 2022 (Imagen), dynamic thresholding: ``s = clamp(quantile(|D|, ratio), 1, max)``
    per example, ``D <- clamp(D, -s, s) / s``."""
    flat = d.reshape(d.shape[0], -1)
    s = torch.quantile(flat.abs().float(), ratio, dim=1).to(d.dtype).clamp(1.0, max_value)
    s = append_dims(s, d.ndim)
    return torch.maximum(torch.minimum(d, s), -s) / s


def bind(denoiser: Callable, **cond) -> Callable:
    """``denoiser`` with ``cond`` fixed: ``D'(x, sigma) = denoiser(x, sigma, **cond)``.

    A tensor (or a tensor inside a dict, as ``added_cond_kwargs``) whose first dimension is 1 is
    expanded to the batch, so one prompt embedding ``[1, L, E]`` serves any batch; other tensors must
    already have the batch's first dimension.
    """

    def expand(v, b):
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == 1 and b != 1:
            return v.expand(b, *v.shape[1:])
        if isinstance(v, dict):
            return {k: expand(w, b) for k, w in v.items()}
        return v

    def bound(x: Tensor, sigma: Tensor, **more) -> Tensor:
        return denoiser(x, sigma, **{k: expand(v, x.shape[0]) for k, v in cond.items()}, **more)

    return bound


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _model_folder(path: Path, subfolder: str | None) -> Path:
    """The folder holding the model's config.json: ``path/subfolder``, or a pipeline's unet/transformer."""
    if subfolder:
        folder = path / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: no subfolder {subfolder!r}")
        return folder
    if (path / "config.json").is_file():
        return path
    for name in ("unet", "transformer", "prior"):  # a pipeline folder's denoising model
        if (path / name / "config.json").is_file():
            return path / name
    raise FileNotFoundError(
        f"{path}: no model config.json here (nor a pipeline's unet/ or transformer/); give the "
        "folder written by save_pretrained, or subfolder="
    )


def _scheduler_config(scheduler, path: Path | None, folder: Path | None) -> dict[str, Any]:
    """The scheduler config: given (dict, scheduler object, file or folder) or found next to the model."""
    if scheduler is not None:
        if isinstance(scheduler, dict):
            return dict(scheduler)
        if isinstance(scheduler, (str, os.PathLike)):
            p = Path(scheduler)
            p = p / "scheduler_config.json" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(
                    f"scheduler={str(scheduler)!r}: no scheduler_config.json there"
                )
            return _read_json(p)
        config = getattr(scheduler, "config", None)
        if config is None:
            raise ValueError(
                f"scheduler must be a dict, a path or a diffusers scheduler, got {type(scheduler).__name__}"
            )
        return {"_class_name": type(scheduler).__name__, **dict(config)}
    candidates = []
    for base in (folder, path, folder.parent if folder else None):
        if base is not None:
            candidates += [
                base / "scheduler_config.json",
                base / "scheduler" / "scheduler_config.json",
            ]
    for c in candidates:
        if c.is_file():
            return _read_json(c)
    where = path or folder
    raise FileNotFoundError(
        f"{where}: no scheduler_config.json (looked in the model folder, the pipeline's scheduler/ "
        "and the folder above); pass scheduler= (a dict, a path or a diffusers scheduler)"
    )


def _model_class(diffusers, config: dict[str, Any], where: Path):
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"{where}/config.json: _class_name {name!r} is not a diffusers model class "
            "(e.g. UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel)"
        )
    return cls


def _load_model(diffusers, file_or_folder: Path, *, allow_pickle: bool) -> nn.Module:
    """A diffusers model from a save_pretrained folder or a single safetensors file with a config.json."""
    if file_or_folder.is_file():
        if file_or_folder.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ValueError(_pickle_refusal(file_or_folder))
        if file_or_folder.suffix != ".safetensors" and file_or_folder.suffix not in PICKLE_SUFFIXES:
            raise ValueError(f"{file_or_folder}: expected a .safetensors file or a model folder")
        folder = file_or_folder.parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{file_or_folder}: no config.json next to the weights")
        config = _read_json(folder / "config.json")
        model = _model_class(diffusers, config, folder).from_config(config)
        if file_or_folder.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file_or_folder))
        else:
            state = torch.load(str(file_or_folder), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return model
    config = _read_json(file_or_folder / "config.json")
    cls = _model_class(diffusers, config, file_or_folder)
    files = [p.name for p in file_or_folder.iterdir() if p.is_file()]
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if not pickles:
            raise FileNotFoundError(
                f"{file_or_folder}: config.json but no weights (found {sorted(files)}); expected "
                f"{WEIGHTS}.safetensors"
            )
        if not allow_pickle:
            raise ValueError(_pickle_refusal(file_or_folder / pickles[0]))
        return cls.from_pretrained(
            str(file_or_folder),
            use_safetensors=False,
            local_files_only=True,
            low_cpu_mem_usage=False,
        )
    return cls.from_pretrained(
        str(file_or_folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
    )


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path}: a pickle checkpoint, which can run code when loaded; scorekit loads safetensors "
        "only. Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust its source"
    )


def from_diffusers(
    path_or_model: str | os.PathLike | nn.Module,
    *,
    scheduler=None,
    subfolder: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    clip_sample: bool | None = None,
    clip_sample_range: float | None = None,
    thresholding: bool | None = None,
    timesteps: str = "fractional",
    allow_pickle: bool = False,
) -> DiffusersDenoiser:
    """A diffusers model as a scorekit denoiser ``D(x, sigma, **cond)`` in the sigma frame.

    Args:
        path_or_model: a ``save_pretrained`` model folder, a pipeline folder (its ``unet/`` or
            ``transformer/`` is used, or ``subfolder``), a ``.safetensors`` file with a ``config.json``
            beside it, or a diffusers model object.
        scheduler: the scheduler config: a dict, a ``scheduler_config.json`` (or its folder), or a
            diffusers scheduler. Default: found next to the model (``scheduler_config.json``, the
            pipeline's ``scheduler/``); a model object needs it.
        subfolder: the model's folder inside ``path`` (e.g. ``"unet"``).
        device, dtype: where the model runs and its dtype (e.g. ``torch.float16`` on a GPU); the
            denoiser returns ``x``'s dtype whatever the model's.

    Rare args:
        clip_sample, clip_sample_range, thresholding: clamp the x0 estimate ``D`` to
            ``[-range, range]``, or dynamic thresholding (Saharia et al. 2022). Default: the scheduler
            config's values, and where it has none diffusers' defaults (``clip_sample=True`` with range
            1 for DDPM/DDIM schedulers, False otherwise; thresholding False). Clipping makes ``D``
            non-smooth; turn it off for likelihoods and high-order samplers on data outside [-1, 1].
        timesteps: ``"fractional"`` (default; the model gets ``t(sigma)`` as a float) or ``"round"``
            (nearest table step, for a model that only accepts integer timesteps).
        allow_pickle: load ``.bin`` / ``.ckpt`` pickle checkpoints, which can run code: only for
            files you trust.

    Raises:
        ModuleNotFoundError: diffusers is not installed (one line naming the extra).
        FileNotFoundError / ValueError: a folder without a model or config, an unknown
            ``prediction_type`` / ``beta_schedule``, a pickle without ``allow_pickle``.
    """
    diffusers = require_diffusers()
    if isinstance(path_or_model, nn.Module):
        if scheduler is None:
            raise ValueError(
                "from_diffusers(model): pass scheduler= (a dict, a path or a scheduler)"
            )
        model, path, folder = path_or_model, None, None
    else:
        path = Path(path_or_model)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_file():
            folder = path.parent
            model = _load_model(diffusers, path, allow_pickle=allow_pickle)
        else:
            folder = _model_folder(path, subfolder)
            model = _load_model(diffusers, folder, allow_pickle=allow_pickle)
    sched_cfg = _scheduler_config(scheduler, path, folder)
    mapping = map_config(sched_cfg)
    if device is not None or dtype is not None:  # (diffusers warns on every .to() call)
        model = model.to(device=device, dtype=dtype)
    model = model.eval().requires_grad_(False)
    clip = {k: v for k, v in (("clip_sample", clip_sample), ("clip_sample_range", clip_sample_range),
                              ("thresholding", thresholding)) if v is not None}  # fmt: skip
    return DiffusersDenoiser(model, mapping, sched_cfg, timesteps=timesteps, clip=clip)
