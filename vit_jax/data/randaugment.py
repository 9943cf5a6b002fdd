"""RandAugment (Cubuk et al. 2019): N ops drawn uniformly with replacement from 14, each at magnitude M.

Runs on the uint8 training crop inside the grain workers, before `normalize`, with the example's own
`np.random.Generator` (no global randomness), so an example is augmented the same way on every run and resume.
Every drawn op is applied (as in the paper; timm's RandAugment applies each with probability 0.5 by default).

M is a float in [0, 30]: 10 is the conventional maximum and larger values extrapolate, as in timm. The mapping
follows timm's "increasing" variants, so a larger M is always a stronger op and M = 0 leaves the image unchanged
(except autocontrast and equalize, which have no magnitude). Signed ops (±) take either sign with probability 0.5.

| op           | argument at magnitude M                                 | Pillow call                             |
|--------------|---------------------------------------------------------|-----------------------------------------|
| identity     | -                                                       | -                                       |
| autocontrast | - (per channel: darkest -> 0, brightest -> 255)         | ImageOps.autocontrast                   |
| equalize     | - (per-channel histogram equalisation)                  | ImageOps.equalize                       |
| rotate       | ± (M/10) * 30 degrees about the centre (+ = counter-cw) | Image.rotate                            |
| solarize     | invert pixels >= 256 - int(M/10 * 256), within [0, 256] | ImageOps.solarize                       |
| color        | saturation factor max(0.1, 1 ± (M/10) * 0.9)            | ImageEnhance.Color                      |
| posterize    | keep 8 - round(M/10 * 4) high bits, within [1, 8]       | ImageOps.posterize                      |
| contrast     | factor max(0.1, 1 ± (M/10) * 0.9)                       | ImageEnhance.Contrast                   |
| brightness   | factor max(0.1, 1 ± (M/10) * 0.9)                       | ImageEnhance.Brightness                 |
| sharpness    | factor max(0.1, 1 ± (M/10) * 0.9)                       | ImageEnhance.Sharpness                  |
| shear_x      | x_in = x_out + s * y_out, s = ± (M/10) * 0.3            | Image.transform AFFINE, top-left origin |
| shear_y      | y_in = y_out + s * x_out, s = ± (M/10) * 0.3            | Image.transform AFFINE, top-left origin |
| translate_x  | ± (M/10) * 0.45 * width pixels                          | Image.transform AFFINE                  |
| translate_y  | ± (M/10) * 0.45 * height pixels                         | Image.transform AFFINE                  |

Geometric ops (rotate, shear, translate) take the nearest pixel, as the TensorFlow RandAugment of big_vision and
AugReg does (timm picks bilinear or bicubic, which cost 6-10x more on a 224-px crop), and fill uncovered pixels with
(128, 128, 128); the translation is relative to the image size, so a magnitude means the same on 16-px and 224-px
crops. All ops are Pillow's C implementations (one pass each over a PIL image that stays PIL between ops); Pillow's
enhancers truncate, e.g. brightness gives min(255, floor(factor * x)).

    out = rand_augment(crop_uint8, rng, num_ops=2, magnitude=10)   # uint8 [H, W, 3] -> uint8 [H, W, 3]
    OPS["solarize"](pil_image, 10, rng)                           # one op: PIL image -> PIL image
"""
import math
import numbers
from typing import Optional

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from vit_jax.errors import UserError

MAX_MAGNITUDE = 30.0
FILL = (128, 128, 128)
RESAMPLE = Image.Resampling.NEAREST
_LEVEL = 10.0  # the magnitude that maps to the conventional maximum of each op
_MAX_ROTATE_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.45  # of the image size
_MAX_ENHANCE = 0.9
_MIN_ENHANCE_FACTOR = 0.1


def _signed(value, rng: np.random.Generator):
  return -value if rng.random() < 0.5 else value


def _enhance_factor(magnitude, rng):
  return max(_MIN_ENHANCE_FACTOR, 1.0 + _signed(magnitude / _LEVEL * _MAX_ENHANCE, rng))


def _affine(img, matrix):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=RESAMPLE, fillcolor=FILL)


def solarize_threshold(magnitude) -> int:
  """Pixels >= this are inverted: 256 (none) at M = 0, 0 (all) from M = 10 on."""
  return min(max(256 - int(magnitude / _LEVEL * 256), 0), 256)


def posterize_bits(magnitude) -> int:
  """High bits kept per channel: 8 (all) at M = 0, 4 at M = 10, at least 1."""
  return min(max(8 - int(round(magnitude / _LEVEL * 4)), 1), 8)


# Each op: (PIL RGB image, magnitude, rng) -> PIL RGB image of the same size.


def identity(img, magnitude, rng):
  del magnitude, rng
  return img


def autocontrast(img, magnitude, rng):
  del magnitude, rng
  return ImageOps.autocontrast(img)


def equalize(img, magnitude, rng):
  del magnitude, rng
  return ImageOps.equalize(img)


def rotate(img, magnitude, rng):
  degrees = _signed(magnitude / _LEVEL * _MAX_ROTATE_DEGREES, rng)
  return img.rotate(degrees, resample=RESAMPLE, fillcolor=FILL)


def solarize(img, magnitude, rng):
  del rng
  return ImageOps.solarize(img, solarize_threshold(magnitude))


def color(img, magnitude, rng):
  return ImageEnhance.Color(img).enhance(_enhance_factor(magnitude, rng))


def posterize(img, magnitude, rng):
  del rng
  return ImageOps.posterize(img, posterize_bits(magnitude))


def contrast(img, magnitude, rng):
  return ImageEnhance.Contrast(img).enhance(_enhance_factor(magnitude, rng))


def brightness(img, magnitude, rng):
  return ImageEnhance.Brightness(img).enhance(_enhance_factor(magnitude, rng))


def sharpness(img, magnitude, rng):
  return ImageEnhance.Sharpness(img).enhance(_enhance_factor(magnitude, rng))


def shear_x(img, magnitude, rng):
  return _affine(img, (1, _signed(magnitude / _LEVEL * _MAX_SHEAR, rng), 0, 0, 1, 0))


def shear_y(img, magnitude, rng):
  return _affine(img, (1, 0, 0, _signed(magnitude / _LEVEL * _MAX_SHEAR, rng), 1, 0))


def translate_x(img, magnitude, rng):
  return _affine(img, (1, 0, _signed(magnitude / _LEVEL * _MAX_TRANSLATE, rng) * img.width, 0, 1, 0))


def translate_y(img, magnitude, rng):
  return _affine(img, (1, 0, 0, 0, 1, _signed(magnitude / _LEVEL * _MAX_TRANSLATE, rng) * img.height))


OPS = {f.__name__: f for f in (identity, autocontrast, equalize, rotate, solarize, color, posterize, contrast,
                               brightness, sharpness, shear_x, shear_y, translate_x, translate_y)}


def rand_augment(image, rng: np.random.Generator, num_ops: int, magnitude: float) -> np.ndarray:
  """`num_ops` ops drawn uniformly with replacement from `OPS`, applied in order at `magnitude`.

  `image` is a uint8 [H, W, 3] array or an RGB PIL image; returns a uint8 [H, W, 3] array. Draws from `rng` only
  (the op indices first, then each op's sign), so the same generator state gives the same output.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"rand_augment takes uint8 [H, W, 3] images, not {image.dtype} {image.shape}")
    if not num_ops:
      return image
    img = Image.fromarray(image)
  else:
    img = image.convert("RGB")
  ops = tuple(OPS.values())  # read per call: OPS is the one list of ops (tests swap it for recorders)
  for index in rng.integers(len(ops), size=int(num_ops)):
    img = ops[index](img, magnitude, rng)
  return np.asarray(img, np.uint8)


def parse_randaug(value, setting="config.pp.randaug", example="(2, 10)", shown=None, off="()") -> Optional[tuple]:
  """(num_ops, magnitude) from a `pp.randaug` value, or None when off (None or empty).

  A UserError names `setting` and the value (`shown`, default the value as a tuple) and gives `example` as the fix
  (and `off`, how to turn it off, for a value that is no pair).
  """
  if value is None or (isinstance(value, (tuple, list, str)) and not value):
    return None
  if shown is None:
    shown = repr(tuple(value) if isinstance(value, list) else value)

  def fail(why):
    raise UserError(f"{setting}={shown}: {why}; e.g. {example}")

  if not isinstance(value, (tuple, list)) or len(value) != 2:
    fail(f"must be a pair (N, M) of ops per image and magnitude, or {off} for off")
  num_ops, magnitude = value
  if isinstance(num_ops, bool) or not isinstance(num_ops, numbers.Integral) or num_ops < 0:
    fail("N must be an int >= 0")
  if (isinstance(magnitude, bool) or not isinstance(magnitude, numbers.Real) or not math.isfinite(magnitude)
      or not 0 <= magnitude <= MAX_MAGNITUDE):
    fail(f"M must be in [0, {MAX_MAGNITUDE:g}]")
  return int(num_ops), float(magnitude)
