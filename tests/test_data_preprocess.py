"""Preprocessing against hand computations: crop boxes, resizes, decoding, scaling."""
import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from vit_jax.data import preprocess as pp
from vit_jax.errors import UserError


def _gradient(h, w):
  y, x = np.mgrid[0:h, 0:w]
  return (x + 2 * y).astype(np.uint8)  # linear, so bilinear filtering of it is exact away from borders


def test_crop_resize_matches_hand_computed_linear_values():
  img = Image.fromarray(_gradient(60, 100)).convert("RGB")
  top, left, h, w, size = 10, 20, 40, 40, 20
  out = pp.crop_resize(img, (top, left, h, w), size)
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  i, j = np.mgrid[0:size, 0:size]
  # Output pixel centre (i + .5, j + .5) maps to input centre left + (j + .5) * w / size - .5 (and y alike).
  x = left + (j + 0.5) * w / size - 0.5
  y = top + (i + 0.5) * h / size - 0.5
  np.testing.assert_allclose(out[..., 0], x + 2 * y, atol=1)
  assert (out[..., 0] == out[..., 2]).all()


def test_central_crop_box_equals_resize_then_crop():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
  resized = np.asarray(img.resize((40, 40), Image.Resampling.BILINEAR), np.int32)
  expected = resized[4:36, 4:36]  # central 32 of 40: offset (40 - 32) // 2
  got = pp.crop_resize(img, pp.central_crop_box(48, 64, 40, 32), 32).astype(np.int32)
  assert np.abs(got - expected).max() <= 1


def test_inception_box_ranges_and_fallback():
  rng = np.random.default_rng(0)
  boxes = np.array([pp.sample_inception_box(rng, 375, 500) for _ in range(2000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
  area = h * w / (375 * 500)
  assert area.min() >= 0.05 and area.max() <= 1.0
  aspect = w / h
  assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
  assert area.min() < 0.1 and area.max() > 0.8  # the whole range is used
  assert len({tuple(b) for b in boxes}) > 1900
  # A 1x100 strip has no crop of area >= 5% with aspect in [3/4, 4/3]: the whole image, as TF falls back to.
  assert pp.sample_inception_box(rng, 1, 100) == (0, 0, 1, 100)


def test_inception_crop_flips_and_sizes():
  img = Image.fromarray(_gradient(40, 50)).convert("RGB")
  outs = [pp.inception_crop(img, np.random.default_rng(s), 16) for s in range(40)]
  assert all(o.shape == (16, 16, 3) for o in outs)
  # x increases to the right unless flipped; both must happen.
  increasing = [int(o[8, -1, 0]) > int(o[8, 0, 0]) for o in outs]
  assert any(increasing) and not all(increasing)


def _encode(array, fmt, mode=None):
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, fmt)
  return buf.getvalue()


@pytest.mark.parametrize("array,fmt", [
    (np.full((5, 7), 200, np.uint8), "PNG"),  # grey
    (np.dstack([np.full((5, 7), 200, np.uint8)] * 3 + [np.zeros((5, 7), np.uint8)]), "PNG"),  # RGBA, alpha 0
    (np.full((5, 7, 3), 200, np.uint8), "JPEG"),
])
def test_decode_any_mode_to_rgb(array, fmt):
  out = np.asarray(pp.decode(_encode(array, fmt)))
  assert out.shape == (5, 7, 3)
  assert np.abs(out.astype(int) - 200).max() <= 2


def test_decode_arrays_and_corrupt():
  assert np.asarray(pp.decode(np.zeros((3, 4, 1), np.uint8))).shape == (3, 4, 3)
  assert np.asarray(pp.decode(np.zeros((3, 4, 4), np.uint8))).shape == (3, 4, 3)
  with pytest.raises(pp.CorruptImage):
    pp.decode(b"not an image")
  with pytest.raises(pp.CorruptImage):
    pp.decode(_encode(np.zeros((64, 64, 3), np.uint8), "JPEG")[:100])  # truncated


def test_normalize_range():
  np.testing.assert_allclose(pp.normalize(np.array([0, 127.5, 255])), [-1, 0, 1])


def test_affine_without_motion_is_a_resize():
  img = Image.fromarray(_gradient(8, 8)).convert("RGB")
  out = pp.random_affine(img, np.random.default_rng(0), 16, max_rotate=0, scale_range=(1, 1), max_translate=0)
  i, j = np.mgrid[0:16, 0:16]
  x, y = (j + 0.5) / 2 - 0.5, (i + 0.5) / 2 - 0.5
  inner = (slice(1, 15), slice(1, 15))  # bilinear of a linear image is exact away from the border
  np.testing.assert_allclose(out[..., 0][inner], (x + 2 * y)[inner], atol=1)
  moved = pp.random_affine(img, np.random.default_rng(0), 16)
  assert moved.shape == (16, 16, 3) and not np.array_equal(moved, out)


@pytest.mark.parametrize("cfg", [
    ml_collections.ConfigDict(dict(crop=8, resize=None, augment="inception_crop")),
    dict(crop=8, resize=None, augment="inception_crop"),
    dict(crop=8),  # the defaults: inception crop, no resize
])
def test_train_and_eval_preprocess_outputs(cfg):
  pp.check_pp(cfg)
  record = {"image": _encode(np.full((20, 30, 3), 255, np.uint8), "PNG"), "label": 3, "id": "x"}
  ex = pp.TrainPreprocess(cfg)(record, np.random.default_rng(0))
  assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32 and ex["_skipped"] == ""
  np.testing.assert_allclose(ex["image"], 1.0)
  bad = pp.EvalPreprocess(cfg)({"image": b"junk", "label": 1, "id": "bad.jpg"})
  assert bad["mask"] == 0 and bad["_skipped"].startswith("bad.jpg")
  mix = pp.Mixup(0.2, 4)({"image": np.stack([np.ones((2, 2, 3)), -np.ones((2, 2, 3))]).astype(np.float32),
                          "label": np.array([0, 1])}, np.random.default_rng(0))
  np.testing.assert_allclose(mix["label"].sum(1), 1, rtol=1e-6)
  lam = mix["label"][0, 0]
  np.testing.assert_allclose(mix["image"][0], lam - (1 - lam), rtol=1e-5)


@pytest.mark.parametrize("make", [dict, ml_collections.ConfigDict])
def test_check_pp_names_the_config_key(make):
  for bad, match in [(dict(crop=0), r"config\.pp\.crop=0 must be a positive int"),
                     (dict(), r"config\.pp\.crop=None must be a positive int"),
                     (dict(crop=8, resize=4), r"config\.pp\.resize=4 must be None or an int >= pp\.crop=8"),
                     (dict(crop=8, augment="randaugment"), r"config\.pp\.augment='randaugment' is not one of"),
                     (dict(crop=8, mixup=-1.0), r"config\.pp\.mixup=-1\.0 must be >= 0")]:
    with pytest.raises(UserError, match=match):
      pp.check_pp(make(bad))


def test_eval_resize_then_central_crop():
  record = {"image": np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3), "label": 0, "id": "x"}
  ex = pp.EvalPreprocess({"crop": 8, "resize": 10})(record)
  expected = pp.crop_resize(pp.decode(record["image"]), pp.central_crop_box(20, 20, 10, 8), 8)
  np.testing.assert_array_equal(ex["image"], pp.normalize(expected))
  assert ex["mask"] == 1


@pytest.mark.parametrize("make", [dict, ml_collections.ConfigDict])
def test_check_pp_cutmix_and_switch_prob(make):
  for good in [dict(crop=8, cutmix=1.0), dict(crop=8, cutmix=0, mixup=0.2, mix_switch_prob=0.0),
               dict(crop=8, mixup=0.2, cutmix=1.0, mix_switch_prob=1)]:
    pp.check_pp(make(good))
  for bad, match in [(dict(crop=8, cutmix=-0.5), r"^config\.pp\.cutmix=-0\.5 must be >= 0 \(0 = off\)"),
                     (dict(crop=8, cutmix="1"), r"^config\.pp\.cutmix='1' must be >= 0"),
                     (dict(crop=8, mix_switch_prob=1.5), r"^config\.pp\.mix_switch_prob=1\.5 must be in \[0, 1\]"),
                     (dict(crop=8, mix_switch_prob=-0.1), r"^config\.pp\.mix_switch_prob=-0\.1 must be in \[0, 1\]"),
                     (dict(crop=8, mix_switch_prob=None), r"^config\.pp\.mix_switch_prob=None must be in \[0, 1\]")]:
    with pytest.raises(UserError, match=match):
      pp.check_pp(make(bad))


def _batch(size=4, height=10, width=12, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (size, height, width, 3)).astype(np.float32),
          "label": np.arange(size) % 3, "_position": np.arange(size), "_skipped": ""}


def _pasted_box(before, after):
  """The pasted region, read off the images: where they changed, checked to be one rectangle."""
  changed = (after != before).any(-1).any(0)
  rows, cols = np.nonzero(changed)
  if not rows.size:
    return 0, 0, 0, 0
  top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
  return top, bottom, left, right


def _check_cutmix(batch, out, num_classes=3):
  before = batch["image"]
  top, bottom, left, right = _pasted_box(before, out["image"])
  box = np.zeros(before.shape[1:3], bool)
  box[top:bottom, left:right] = True
  np.testing.assert_array_equal(out["image"][:, box], before[::-1][:, box])  # the reversed batch's pixels
  np.testing.assert_array_equal(out["image"][:, ~box], before[:, ~box])  # the rest untouched
  lam = 1 - box.sum() / box.size
  onehot = np.eye(num_classes)[batch["label"]]
  np.testing.assert_allclose(out["label"], lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6)
  assert out["label"].dtype == np.float32 and out["image"].dtype == np.float32
  assert out["_position"] is batch["_position"]
  return top, bottom, left, right


def test_cutmix_pastes_a_box_of_the_reversed_batch_and_mixes_labels_by_its_area():
  batch = _batch()
  boxes = [_check_cutmix(batch, pp.CutMix(1.0, 3)(batch, np.random.default_rng(seed))) for seed in range(60)]
  height, width = batch["image"].shape[1:3]
  clipped = [b for b in boxes if b[1] > b[0] and (b[0] == 0 or b[1] == height or b[2] == 0 or b[3] == width)]
  assert clipped and len(set(boxes)) > 30  # boxes at the border are included; sizes and places vary
  np.testing.assert_array_equal(batch["image"], _batch()["image"])  # the input batch is not modified


class _FixedDraws:
  """A generator stand-in: beta() gives `lam`, integers() gives the box centre (y, then x)."""

  def __init__(self, lam, centre):
    self.lam, self.centre = lam, list(centre)

  def beta(self, a, b):
    del a, b
    return self.lam

  def integers(self, high):
    value = self.centre.pop(0)
    assert 0 <= value < high
    return value


def test_cutmix_box_clipped_at_the_border_by_hand():
  # lam = 0.75: sqrt(1 - lam) = 0.5 -> a 5 x 6 cut on 10 x 12, so half sizes 5 // 2 = 2 and 6 // 2 = 3.
  assert pp.cutmix_box(_FixedDraws(0.75, (5, 6)), 10, 12, 0.75) == (3, 7, 3, 9)
  # Centre (0, 11): rows [-2, 2) and columns [8, 14) clip to [0, 2) and [8, 12): 2 x 4 pixels of 120.
  assert pp.cutmix_box(_FixedDraws(0.75, (0, 11)), 10, 12, 0.75) == (0, 2, 8, 12)
  batch = _batch()
  out = pp.CutMix(1.0, 3)(batch, _FixedDraws(0.75, (0, 11)))
  assert _check_cutmix(batch, out) == (0, 2, 8, 12)
  lam = 1 - 8 / 120  # by the area pasted, not the 0.75 drawn
  onehot = np.eye(3)[batch["label"]]
  np.testing.assert_allclose(out["label"], lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6)


def _is_cutmix(batch, out):
  """Cutmix leaves every pixel either its own or the reversed batch's; mixup (alpha 1) blends them all."""
  before = batch["image"]
  return bool(((out["image"] == before) | (out["image"] == before[::-1])).all())


@pytest.mark.parametrize("switch_prob", [0.0, 0.3, 1.0])
def test_mix_batch_switches_to_cutmix_with_the_switch_probability(switch_prob):
  batch = _batch()
  mix = pp.MixBatch(1.0, 1.0, switch_prob, 3)
  picks = [_is_cutmix(batch, mix(batch, np.random.default_rng(seed))) for seed in range(400)]
  fraction = np.mean(picks)
  if switch_prob in (0, 1):
    assert fraction == switch_prob
  else:
    assert abs(fraction - switch_prob) < 0.1  # 4 standard deviations of 400 draws
  for seed, picked in enumerate(picks[:20]):
    out = mix(batch, np.random.default_rng(seed))
    if picked:
      _check_cutmix(batch, out)
    else:
      np.testing.assert_allclose(out["label"].sum(1), 1, rtol=1e-6)


def test_mix_batch_with_one_of_them_is_that_op_exactly():
  batch = _batch()
  for seed in range(5):
    mixup_only = pp.MixBatch(0.4, 0.0, 0.5, 3)(batch, np.random.default_rng(seed))
    mixup = pp.Mixup(0.4, 3)(batch, np.random.default_rng(seed))  # the op the pipeline ran before cutmix existed
    cutmix_only = pp.MixBatch(0.0, 1.0, 0.5, 3)(batch, np.random.default_rng(seed))
    cutmix = pp.CutMix(1.0, 3)(batch, np.random.default_rng(seed))
    for key in ("image", "label"):
      np.testing.assert_array_equal(mixup_only[key], mixup[key])
      np.testing.assert_array_equal(cutmix_only[key], cutmix[key])
  assert pp.MixBatch.from_pp({"crop": 8}, 3) is None
  assert pp.MixBatch.from_pp({"crop": 8, "mixup": 0.0, "cutmix": None}, 3) is None
  both = pp.MixBatch.from_pp({"crop": 8, "mixup": 0.2, "cutmix": 1.0}, 3)
  assert both.switch_prob == 0.5 and both.mixup.alpha == 0.2 and both.cutmix.alpha == 1.0


def test_random_crop_flip_is_a_window_of_the_squashed_image_as_bit():
  """Every output is one of the (resize - crop + 1)^2 windows of the image resized to resize x resize, or its
  mirror image; all offsets and both flips occur."""
  rng_image = np.random.default_rng(0)
  img = Image.fromarray(rng_image.integers(0, 256, (24, 40, 3), np.uint8))
  crop, resize = 8, 12
  squashed = np.asarray(img.resize((resize, resize), Image.Resampling.BILINEAR), np.int32)
  windows = {(t, l): squashed[t:t + crop, l:l + crop] for t in range(resize - crop + 1)
             for l in range(resize - crop + 1)}
  seen = set()
  rng = np.random.default_rng(1)
  for _ in range(200):
    out = pp.random_crop_flip(img, rng, crop, resize).astype(np.int32)
    matches = [(key, flip) for key, window in windows.items() for flip in (False, True)
               if np.abs((window[:, ::-1] if flip else window) - out).max() <= 1]  # one resize pass vs two
    assert len(matches) >= 1
    seen.update(matches)
  assert {key for key, _ in seen} == set(windows) and {flip for _, flip in seen} == {False, True}
  # Without pp.resize it is a plain resize, flipped or not.
  out = pp.random_crop_flip(img, np.random.default_rng(2), crop)
  plain = pp.plain_resize(img, None, crop)
  assert np.array_equal(out, plain) or np.array_equal(out, plain[:, ::-1])
