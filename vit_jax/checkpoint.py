"""The documented checkpoint API (`load`, `save`, `load_pretrained`, `interpolate_posembed`) of model-zoo `.npz`
files. The format lives in `vit_jax.models.zoo`; training-state checkpoints are `vit_jax.workdir`'s."""
from vit_jax.models.zoo import (POSEMB_KEY, ZOO_URL, interpolate_posembed, load, load_pretrained, resample_posemb,
                                resize_grid, save)

__all__ = ["POSEMB_KEY", "ZOO_URL", "interpolate_posembed", "load", "load_pretrained", "resample_posemb",
           "resize_grid", "save"]
