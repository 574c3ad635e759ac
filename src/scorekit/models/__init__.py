"""Denoisers from models trained elsewhere, loaded from local files, and scorekit runs written out.

* ``from_diffusers(path_or_model, *, scheduler=None, subfolder=None, device=None, dtype=None)``: a
  diffusers UNet or transformer with its scheduler config as a denoiser ``D(x, sigma, **cond)``
  (``scorekit.models.diffusers``; the config mapping is ``scorekit.models.config``).
* ``bind(denoiser, **cond)``: conditioning (class labels, prompt embeddings) fixed into a denoiser.
* A k-diffusion-style model ``model(x, sigma, **extra) -> denoised`` is already a denoiser: pass it
  to any sampler as it is (see docs/bring-your-own-model.md).
* ``save_exported`` / ``load_exported`` (``scorekit.models.export``): a trained network as safetensors
  + JSON + a model card, loaded back without running code.

diffusers is optional (``pip install 'scorekit[diffusers]'``) and imported only when a diffusers model
is loaded.
"""

from __future__ import annotations

from scorekit.models.config import map_config, schedule_sigmas
from scorekit.models.diffusers import DiffusersDenoiser, bind, from_diffusers
from scorekit.models.export import load_exported, save_exported

__all__ = [
    "DiffusersDenoiser",
    "bind",
    "from_diffusers",
    "load_exported",
    "map_config",
    "save_exported",
    "schedule_sigmas",
]
