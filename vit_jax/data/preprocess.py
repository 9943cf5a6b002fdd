"""Per-example preprocessing in numpy/PIL, run inside grain workers.

Zoo conventions: training takes an Inception-style random crop (TF's `sample_distorted_bounding_box` with
area_range=(0.05, 1), aspect_ratio_range=(3/4, 4/3), min_object_covered=0, 100 attempts, whole image as the
fallback) plus a random horizontal flip, resized to `pp.crop`; evaluation resizes to `pp.crop` (or to
`pp.resize` then takes the central `pp.crop`); pixels are scaled to [-1, 1] as x / 127.5 - 1.

Resizing is PIL bilinear with a source box, so crop + resize is one pass over the pixels. When enlarging it
equals TF's `tf.image.resize` (half-pixel centres); when shrinking PIL low-pass filters (like
`tf.image.resize(..., antialias=True)`) where the zoo's TF code did not, which moves pixels by a few levels.

A training op is `op(image: PIL.Image, rng, crop) -> uint8 array [crop, crop, 3]` in `TRAIN_OPS`, chosen by
`pp.augment`. `pp.randaug` = (N, M) then applies RandAugment (vit_jax/data/randaugment.py) to that uint8 crop,
drawing from the same per-example generator after the crop op. `pp` is the preprocessing part of the training
config (`config.pp`): any mapping, a ConfigDict or a dict, read with `pp["crop"]` / `pp.get(key, default)` only, so
callers outside training need no config.

Batch ops run on whole (per-process) batches of normalised images with a generator per batch: `Mixup` blends each
image with the batch reversed; `CutMix` pastes a box of the batch reversed; `MixBatch` picks one of them per batch.
"""
import functools
import io
import math
import numbers

import numpy as np
from PIL import Image

from vit_jax.data import randaugment
from vit_jax.errors import UserError

AREA_RANGE = (0.05, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 100


class CorruptImage(Exception):
  """An image that cannot be decoded; the pipeline skips and counts it (or fails when strict)."""


def decode(image) -> Image.Image:
  """Encoded bytes (JPEG/PNG/...) or a uint8 array, any size, grey/RGB/RGBA/palette -> an RGB PIL image."""
  if image is None:
    raise CorruptImage("unreadable file")
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
      image = image[..., :3]  # drop alpha, as tf.image.decode_image(channels=3) does
    return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  try:
    img = Image.open(io.BytesIO(image))
    img.load()  # decode now: a truncated file must fail here, not later
    if img.mode in ("I;16", "I;16B", "I"):  # 16-bit grey PNG: scale to 8 bits instead of clipping
      img = Image.fromarray((np.asarray(img, np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")  # RGBA drops alpha, L/LA/P/CMYK become RGB
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
    raise CorruptImage(f"{type(e).__name__}: {e}") from None


def sample_inception_box(rng: np.random.Generator, height: int, width: int,
                         area_range=AREA_RANGE, aspect_range=ASPECT_RANGE, max_attempts=MAX_ATTEMPTS):
  """(top, left, crop_height, crop_width) like TF's sample_distorted_bounding_box (GenerateRandomCrop).

  TF draws the aspect ratio uniformly, then the crop height uniformly between the heights giving the minimum
  and maximum area; it retries `max_attempts` times and falls back to the whole image.
  """
  for _ in range(max_attempts):
    aspect = rng.uniform(*aspect_range)
    box = _generate_random_crop(rng, width, height, area_range, aspect)
    if box is not None:
      return box
  return 0, 0, height, width


def _lrint(x):
  return int(round(x))  # round half to even, like C's lrintf


def _generate_random_crop(rng, original_width, original_height, area_range, aspect_ratio):
  min_area = area_range[0] * original_width * original_height
  max_area = area_range[1] * original_width * original_height
  height = _lrint(math.sqrt(min_area / aspect_ratio))
  max_height = _lrint(math.sqrt(max_area / aspect_ratio))
  if _lrint(max_height * aspect_ratio) > original_width:
    # The largest max_height with round(max_height * aspect_ratio) <= original_width.
    max_height = int((original_width + 0.5 - 1e-7) / aspect_ratio)
    if _lrint(max_height * aspect_ratio) > original_width:
      max_height -= 1
  max_height = min(max_height, original_height)
  height = min(height, max_height)
  if height < max_height:
    height += int(rng.integers(max_height - height + 1))
  width = _lrint(height * aspect_ratio)
  area = width * height
  if area < min_area:
    height += 1
    width = _lrint(height * aspect_ratio)
    area = width * height
  if area > max_area:
    height -= 1
    width = _lrint(height * aspect_ratio)
    area = width * height
  if (area < min_area or area > max_area or width > original_width or height > original_height
      or width <= 0 or height <= 0):
    return None
  top = int(rng.integers(original_height - height)) if height < original_height else 0
  left = int(rng.integers(original_width - width)) if width < original_width else 0
  return top, left, height, width


def crop_resize(img: Image.Image, box, size: int) -> np.ndarray:
  """Crop `box` = (top, left, height, width) (floats allowed) and resize it to size x size, in one pass."""
  top, left, h, w = box
  out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  return np.asarray(out, np.uint8)


def central_crop_box(height: int, width: int, resize: int, crop: int):
  """The box of the original that becomes the central `crop` after resizing the whole image to `resize`.

  Resizing to resize x resize then cropping equals resizing this box straight to crop x crop (same filter
  scale), without materialising the intermediate image.
  """
  offset = (resize - crop) // 2
  sy, sx = height / resize, width / resize
  return offset * sy, offset * sx, crop * sy, crop * sx


def normalize(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ train ops


def inception_crop(img, rng, crop):
  top, left, h, w = sample_inception_box(rng, img.height, img.width)
  out = crop_resize(img, (top, left, h, w), crop)
  return out[:, ::-1] if rng.random() < 0.5 else out


def random_affine(img, rng, crop, max_rotate=10.0, scale_range=(0.9, 1.1), max_translate=0.1):
  """Small random rotation/scale/translation fused with the resize to crop x crop (one interpolation).

  Enough augmentation for a small ViT to generalise on tiny datasets such as `digits`; the fill is black,
  which is the background of `digits`.
  """
  angle = math.radians(rng.uniform(-max_rotate, max_rotate))
  scale = rng.uniform(*scale_range)
  tx, ty = rng.uniform(-max_translate, max_translate, size=2) * crop
  # PIL's AFFINE maps output coordinates to input ones: p_in = c_in + (in/out) * R(-angle) (p_out - c_out - t) / s.
  cos, sin = math.cos(angle), math.sin(angle)
  kx, ky = img.width / crop / scale, img.height / crop / scale
  a, b = kx * cos, kx * sin
  d, e = -ky * sin, ky * cos
  ox, oy = crop / 2 + tx, crop / 2 + ty
  c = img.width / 2 - a * ox - b * oy
  f = img.height / 2 - d * ox - e * oy
  out = img.transform((crop, crop), Image.Transform.AFFINE, (a, b, c, d, e, f),
                      resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
  return np.asarray(out, np.uint8)


def plain_resize(img, rng, crop):
  del rng
  return crop_resize(img, (0, 0, img.height, img.width), crop)


def random_crop_flip(img, rng, crop, resize=None):
  """BiT's training crop: the image squashed to `resize` x `resize` (`pp.resize`, default `crop`), a uniformly
  placed `crop` x `crop` window of it, and a random horizontal flip; one resize pass, as `central_crop_box`."""
  resize = resize or crop
  top, left = (int(v) for v in rng.integers(0, resize - crop + 1, size=2))
  sy, sx = img.height / resize, img.width / resize
  out = crop_resize(img, (top * sy, left * sx, crop * sy, crop * sx), crop)
  return out[:, ::-1] if rng.random() < 0.5 else out


TRAIN_OPS = {"inception_crop": inception_crop, "affine": random_affine, "none": plain_resize,
             "random_crop_flip": random_crop_flip}
RESIZING_OPS = ("random_crop_flip",)  # the train ops that read `pp.resize`
DEFAULT_AUGMENT = "inception_crop"
DEFAULT_MIX_SWITCH_PROB = 0.5


def check_pp(pp):
  """UserError naming the `config.pp` key when `pp` (any mapping) cannot be preprocessed with."""
  augment = pp.get("augment", DEFAULT_AUGMENT)
  if augment not in TRAIN_OPS:
    raise UserError(f"config.pp.augment={augment!r} is not one of {sorted(TRAIN_OPS)}")
  crop = pp.get("crop")
  if not isinstance(crop, int) or crop <= 0:
    raise UserError(f"config.pp.crop={crop!r} must be a positive int")
  resize = pp.get("resize")
  if resize is not None and (not isinstance(resize, int) or resize < crop):
    raise UserError(f"config.pp.resize={resize!r} must be None or an int >= pp.crop={crop}")
  randaugment.parse_randaug(pp.get("randaug", ()))
  for key in ("mixup", "cutmix"):
    alpha = pp.get(key, 0.0)
    if not _is_number(alpha or 0.0) or float(alpha or 0.0) < 0:
      raise UserError(f"config.pp.{key}={alpha!r} must be >= 0 (0 = off); e.g. 0.2, a Beta(alpha, alpha) mixing ratio")
  switch_prob = pp.get("mix_switch_prob", DEFAULT_MIX_SWITCH_PROB)
  if not _is_number(switch_prob) or not 0 <= switch_prob <= 1:
    raise UserError(f"config.pp.mix_switch_prob={switch_prob!r} must be in [0, 1]: the share of batches that use "
                    "cutmix when mixup and cutmix are both on; e.g. 0.5")


def _is_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------- picklable per-example callables


def _corrupt_example(record, crop, reason):
  return {"image": np.zeros((crop, crop, 3), np.float32), "label": np.int32(record["label"]),
          "_skipped": f"{record['id']} ({reason})"}


class TrainPreprocess:
  """(raw record, rng) -> {'image' float32 [crop, crop, 3] in [-1, 1], 'label' int32, '_skipped' str}."""

  def __init__(self, pp):
    self.crop = pp["crop"]
    augment = pp.get("augment", DEFAULT_AUGMENT)
    self.op = TRAIN_OPS[augment]
    if augment in RESIZING_OPS:
      self.op = functools.partial(self.op, resize=pp.get("resize"))
    self.randaug = randaugment.parse_randaug(pp.get("randaug", ()))  # (num_ops, magnitude) or None

  def __call__(self, record, rng):
    try:
      img = decode(record["image"])
    except CorruptImage as e:
      return _corrupt_example(record, self.crop, e)
    image = self.op(img, rng, self.crop)
    if self.randaug:  # after the crop's draws: without randaug the generator is used exactly as before
      image = randaugment.rand_augment(image, rng, *self.randaug)
    return {"image": normalize(image), "label": np.int32(record["label"]), "_skipped": ""}


class EvalPreprocess:
  """record -> eval example with 'mask'; a corrupt image becomes a masked-out example (counted, not scored)."""

  def __init__(self, pp):
    self.crop, self.resize = pp["crop"], pp.get("resize")

  def __call__(self, record):
    try:
      img = decode(record["image"])
    except CorruptImage as e:
      return {**_corrupt_example(record, self.crop, e), "mask": np.float32(0)}
    if self.resize:
      box = central_crop_box(img.height, img.width, self.resize, self.crop)
    else:
      box = (0, 0, img.height, img.width)
    return {"image": normalize(crop_resize(img, box, self.crop)), "label": np.int32(record["label"]),
            "mask": np.float32(1), "_skipped": ""}

  def padding(self):
    return {"image": np.zeros((self.crop, self.crop, 3), np.float32), "label": np.int32(0),
            "mask": np.float32(0), "_skipped": ""}


def _mix_labels(labels, num_classes, lam):
  onehot = np.eye(num_classes, dtype=np.float32)[labels]
  return lam * onehot + (1 - lam) * onehot[::-1]


class Mixup:
  """Batch op: mix each example with the batch reversed, lam ~ Beta(alpha, alpha); labels become soft."""

  def __init__(self, alpha: float, num_classes: int):
    self.alpha, self.num_classes = alpha, num_classes

  def __call__(self, batch, rng):
    lam = np.float32(rng.beta(self.alpha, self.alpha))
    batch = dict(batch)
    batch["image"] = lam * batch["image"] + (1 - lam) * batch["image"][::-1]
    batch["label"] = _mix_labels(batch["label"], self.num_classes, lam)
    return batch


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float):
  """(top, bottom, left, right) of a box of about (1 - lam) of the image, clipped to it, as timm's `rand_bbox`.

  The box is 2 * (int(H * sqrt(1 - lam)) // 2) by 2 * (int(W * sqrt(1 - lam)) // 2) around a centre drawn
  uniformly over the pixels; clipping at the border makes it smaller.
  """
  ratio = math.sqrt(1.0 - lam)
  half_height, half_width = int(height * ratio) // 2, int(width * ratio) // 2
  centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
  top, bottom = min(max(centre_y - half_height, 0), height), min(max(centre_y + half_height, 0), height)
  left, right = min(max(centre_x - half_width, 0), width), min(max(centre_x + half_width, 0), width)
  return top, bottom, left, right


class CutMix:
  """Batch op: paste a box of the batch reversed into each image, lam ~ Beta(alpha, alpha) (Yun et al. 2019).

  Labels are mixed by the area actually pasted: lam = 1 - box area / image area, after clipping the box.
  """

  def __init__(self, alpha: float, num_classes: int):
    self.alpha, self.num_classes = alpha, num_classes

  def __call__(self, batch, rng):
    images = batch["image"]
    height, width = images.shape[1:3]
    top, bottom, left, right = cutmix_box(rng, height, width, rng.beta(self.alpha, self.alpha))
    lam = np.float32(1.0 - (bottom - top) * (right - left) / (height * width))
    batch = dict(batch)
    batch["image"] = images.copy()
    batch["image"][:, top:bottom, left:right] = images[::-1, top:bottom, left:right]
    batch["label"] = _mix_labels(batch["label"], self.num_classes, lam)
    return batch


class MixBatch:
  """Batch op: mixup or cutmix, whichever is on (alpha > 0); with both, cutmix with probability `switch_prob`.

  Per batch, as timm's Mixup(switch_prob=...). With mixup alone it draws exactly what `Mixup` draws.
  """

  def __init__(self, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, num_classes: int):
    self.mixup = Mixup(mixup_alpha, num_classes) if mixup_alpha > 0 else None
    self.cutmix = CutMix(cutmix_alpha, num_classes) if cutmix_alpha > 0 else None
    self.switch_prob = switch_prob

  def __call__(self, batch, rng):
    if self.mixup is None and self.cutmix is None:
      return batch
    if self.mixup is None or self.cutmix is None:
      return (self.mixup or self.cutmix)(batch, rng)
    use_cutmix = rng.random() < self.switch_prob  # in [0, 1): never at 0, always at 1
    return (self.cutmix if use_cutmix else self.mixup)(batch, rng)

  @classmethod
  def from_pp(cls, pp, num_classes):
    """The batch op `pp` asks for (mixup, cutmix, mix_switch_prob), or None when both are off."""
    mixup, cutmix = float(pp.get("mixup", 0.0) or 0.0), float(pp.get("cutmix", 0.0) or 0.0)
    if mixup <= 0 and cutmix <= 0:
      return None
    return cls(mixup, cutmix, float(pp.get("mix_switch_prob", DEFAULT_MIX_SWITCH_PROB)), num_classes)
