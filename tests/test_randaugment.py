"""RandAugment op by op against hand computations in numpy or Pillow called directly; determinism; the draws."""
import collections
import math

import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest

from vit_jax.data import preprocess
from vit_jax.data import randaugment as ra
from vit_jax.errors import UserError

SIGNED = ("rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
          "translate_y")
SEEDS = range(8)  # enough for both signs of every signed op (checked where it matters)


def _random_image(height=12, width=17, seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, (height, width, 3), dtype=np.uint8)


def _all_values():
  """16 x 16 x 3 holding every uint8 value in each channel (in different places)."""
  values = np.arange(256, dtype=np.uint8)
  return np.stack([values, values[::-1], np.roll(values, 77)], -1).reshape(16, 16, 3)


def _apply(name, array, magnitude, seed=0):
  out = ra.OPS[name](Image.fromarray(array), magnitude, np.random.default_rng(seed))
  return np.asarray(out)


def _matches_one_of(name, array, magnitude, references):
  """Index of the reference each seed's output equals (all must match one); both signs must occur."""
  chosen = set()
  for seed in SEEDS:
    out = _apply(name, array, magnitude, seed)
    hits = [i for i, ref in enumerate(references) if np.array_equal(out, ref)]
    assert hits, f"{name} at M={magnitude}, seed {seed}: matches no reference"
    chosen.add(hits[0])
  return chosen


def _enhance_factors(magnitude):
  return 1 + magnitude / 10 * 0.9, max(0.1, 1 - magnitude / 10 * 0.9)


def test_the_fourteen_ops():
  assert sorted(ra.OPS) == sorted(["identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
                                   "translate_y"])


@pytest.mark.parametrize("name", sorted(set(ra.OPS) - {"autocontrast", "equalize"}))
def test_magnitude_zero_is_the_identity(name):
  image = _random_image()
  for seed in SEEDS:
    np.testing.assert_array_equal(_apply(name, image, 0.0, seed), image)


@pytest.mark.parametrize("name", sorted(ra.OPS))
@pytest.mark.parametrize("shape", [(16, 16), (9, 23)])
def test_every_op_keeps_uint8_and_shape(name, shape):
  image = _random_image(*shape)
  for magnitude in (0, 3.5, 10, 30):
    out = _apply(name, image, magnitude)
    assert out.dtype == np.uint8 and out.shape == image.shape


@pytest.mark.parametrize("magnitude,threshold", [(0, 256), (2.5, 192), (5, 128), (9, 26), (10, 0), (15, 0), (30, 0)])
def test_solarize_inverts_pixels_at_or_above_the_threshold(magnitude, threshold):
  x = _all_values()
  assert threshold == min(max(256 - int(magnitude / 10 * 256), 0), 256)
  expected = np.where(x >= threshold, 255 - x, x)
  np.testing.assert_array_equal(_apply("solarize", x, magnitude), expected)


@pytest.mark.parametrize("magnitude,bits", [(0, 8), (1, 8), (2.5, 7), (5, 6), (10, 4), (15, 2), (17.5, 1), (30, 1)])
def test_posterize_keeps_the_high_bits(magnitude, bits):
  x = _all_values()
  mask = (0xFF << (8 - bits)) & 0xFF
  np.testing.assert_array_equal(_apply("posterize", x, magnitude), x & mask)


@pytest.mark.parametrize("magnitude", [3, 7.5, 10, 20])
def test_brightness_scales_and_truncates(magnitude):
  x = _all_values()
  # Pillow blends with black in float32 and truncates: min(255, floor(f * x)).
  references = [np.minimum(np.floor(np.float32(f) * x.astype(np.float32)), 255).astype(np.uint8)
                for f in _enhance_factors(magnitude)]
  assert _matches_one_of("brightness", x, magnitude, references) == {0, 1}


@pytest.mark.parametrize("magnitude", [3, 10])
def test_contrast_blends_with_the_mean_grey(magnitude):
  grey = _random_image(16, 16)[..., 0]
  mean = np.float32(int(grey.mean() + 0.5))  # Pillow's rounded mean of the L image (= the grey itself here)
  references = []
  for factor in _enhance_factors(magnitude):
    value = np.floor(mean + np.float32(factor) * (grey.astype(np.float32) - mean))
    references.append(np.repeat(np.clip(value, 0, 255).astype(np.uint8)[..., None], 3, -1))
  assert _matches_one_of("contrast", np.repeat(grey[..., None], 3, -1), magnitude, references) == {0, 1}


@pytest.mark.parametrize("name,enhancer", [("color", ImageEnhance.Color), ("sharpness", ImageEnhance.Sharpness),
                                           ("contrast", ImageEnhance.Contrast)])
def test_enhancers_match_pillow(name, enhancer):
  image = _random_image(20, 24)
  for magnitude in (4, 10, 25):
    references = [np.asarray(enhancer(Image.fromarray(image)).enhance(f)) for f in _enhance_factors(magnitude)]
    assert _matches_one_of(name, image, magnitude, references) == {0, 1}
  # M = 10 with the negative sign is the strongest reduction, factor 0.1 (not 0): colour almost gone.
  assert _enhance_factors(10)[1] == pytest.approx(0.1) and _enhance_factors(20)[1] == 0.1


def test_autocontrast_stretches_each_channel():
  image = _random_image(10, 10, low=40, high=200)
  out = _apply("autocontrast", image, 10).astype(int)
  np.testing.assert_array_equal(out, np.asarray(ImageOps.autocontrast(Image.fromarray(image))))
  low, high = image.min((0, 1)), image.max((0, 1))
  np.testing.assert_allclose(out, (image - low) * 255.0 / (high - low), atol=1)
  assert (out.min((0, 1)) == 0).all() and (out.max((0, 1)) >= 254).all()  # Pillow truncates x * scale + offset
  np.testing.assert_array_equal(_apply("autocontrast", image, 0), out)  # no magnitude


def test_equalize_matches_pillow():
  image = _random_image(20, 20, high=100) // 3 * 2  # a narrow, gappy histogram to spread out
  out = _apply("equalize", image, 10)
  np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(image))))
  assert out.max() > 200 and np.array_equal(_apply("equalize", image, 0), out)


def _shifted(image, dy, dx, fill=128):
  """`image` with its content moved by (dy, dx) pixels, uncovered pixels `fill`."""
  height, width = image.shape[:2]
  out = np.full_like(image, fill)
  out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
      image[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
  return out


@pytest.mark.parametrize("size,pixels", [(20, 1), (20, 3), (20, 9), (16, 5), (224, 2), (224, 100)])
def test_translate_moves_a_white_pixel_by_a_share_of_the_size(size, pixels):
  image = np.zeros((size, size, 3), np.uint8)
  image[3, size // 2] = image[size // 2, 4] = 255
  magnitude = pixels / (0.45 * size) * 10  # translate = (M / 10) * 0.45 * size pixels
  references = [_shifted(image, 0, pixels), _shifted(image, 0, -pixels)]
  assert _matches_one_of("translate_x", image, magnitude, references) == {0, 1}
  references = [_shifted(image, pixels, 0), _shifted(image, -pixels, 0)]
  assert _matches_one_of("translate_y", image, magnitude, references) == {0, 1}


def test_translate_beyond_the_image_is_all_fill():
  assert (_apply("translate_x", _random_image(16, 16), 30) == 128).all()  # 1.35 widths


@pytest.mark.parametrize("name", ["shear_x", "shear_y"])
def test_shear_moves_rows_in_proportion_to_their_distance_from_the_top_left(name):
  height, width = 12, 32
  # The ramp runs along the sheared axis (x for shear_x): value 8 * x. Nearest-pixel sampling: PIL maps each output
  # pixel centre to the input and takes the pixel it falls in.
  across, along = np.mgrid[0:height, 0:width]
  if name == "shear_y":
    across, along = across.T, along.T
  image = np.repeat((8 * along)[..., None], 3, -1).astype(np.uint8)
  signs = set()
  for seed in SEEDS:
    out = _apply(name, image, 10, seed)[..., 0].astype(float)
    fits = []
    for shear in (0.3, -0.3):  # (M / 10) * 0.3 at M = 10
      source = np.floor(along + 0.5 + shear * (across + 0.5))
      inside = (source >= 0) & (source <= width - 1)
      fits.append(np.array_equal(out[inside], 8 * source[inside]) and (out[~inside] == 128).all())
    assert any(fits), seed
    signs.add(fits.index(True))
  assert signs == {0, 1}


def test_rotate_by_ninety_degrees_at_magnitude_thirty():
  image = _random_image(16, 16)
  assert _matches_one_of("rotate", image, 30, [np.rot90(image, 1), np.rot90(image, -1)]) == {0, 1}


def test_rotate_moves_a_pixel_around_the_centre():
  image = np.zeros((33, 33, 3), np.uint8)
  image[15:18, 25:28] = 255  # a 3x3 block centred 10 pixels right of the centre (16.5, 16.5)
  signs = set()
  for seed in SEEDS:
    out = _apply("rotate", image, 10, seed)[..., 0].astype(float)
    for sign in (1, -1):  # +30 degrees is counter-clockwise: up the image
      angle = math.radians(30 * sign)
      y, x = 16.5 - 10 * math.sin(angle), 16.5 + 10 * math.cos(angle)
      window = (slice(int(y) - 3, int(y) + 4), slice(int(x) - 3, int(x) + 4))
      rows, cols = np.mgrid[window]
      mass = out[window].sum()
      if mass > 200:  # nearest sampling moves whole pixels: the block's centre lands within half a pixel
        assert abs((out[window] * (rows + 0.5)).sum() / mass - y) < 0.5
        assert abs((out[window] * (cols + 0.5)).sum() / mass - x) < 0.5
        signs.add(sign)
    corner = out[0, 0]
    assert corner == 128  # the rotated-in corner is filled with grey
  assert signs == {1, -1}


# -------------------------------------------------------------------------------------- rand_augment


def test_same_seed_same_output_and_different_seeds_differ():
  image = _random_image(24, 24)
  outs = [ra.rand_augment(image, np.random.default_rng(seed), 2, 9) for seed in range(8)]
  again = [ra.rand_augment(image, np.random.default_rng(seed), 2, 9) for seed in range(8)]
  assert all(np.array_equal(a, b) for a, b in zip(outs, again))
  assert len({o.tobytes() for o in outs}) == 8
  assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)


def test_no_ops_is_the_identity():
  image = _random_image()
  np.testing.assert_array_equal(ra.rand_augment(image, np.random.default_rng(0), 0, 30), image)
  np.testing.assert_array_equal(ra.rand_augment(Image.fromarray(image), np.random.default_rng(0), 0, 10), image)
  with pytest.raises(ValueError, match="uint8"):
    ra.rand_augment(image.astype(np.float32), np.random.default_rng(0), 2, 10)


def test_ops_are_drawn_uniformly_with_replacement_at_the_magnitude(monkeypatch):
  calls = []

  def recorder(name):
    return lambda img, magnitude, rng: calls.append((name, magnitude)) or img

  monkeypatch.setattr(ra, "OPS", {name: recorder(name) for name in ra.OPS})
  image = _random_image()
  for seed in range(700):
    ra.rand_augment(image, np.random.default_rng(seed), 3, 7.5)
  assert len(calls) == 2100 and {m for _, m in calls} == {7.5}
  counts = collections.Counter(name for name, _ in calls)
  assert set(counts) == set(ra.OPS)
  assert all(abs(n - 150) < 50 for n in counts.values()), counts  # 2100 / 14 = 150, std ~12


# ----------------------------------------------------------------------------------- pp.randaug


@pytest.mark.parametrize("value,expected", [((), None), ([], None), (None, None), ((2, 10), (2, 10.0)),
                                            ([1, 9.5], (1, 9.5)), ((0, 0), (0, 0.0)), ((3, 30), (3, 30.0)),
                                            ((np.int64(2), np.float32(5)), (2, 5.0))])
def test_parse_randaug(value, expected):
  assert ra.parse_randaug(value) == expected


@pytest.mark.parametrize("value,match", [
    ((2, 40), r"^config\.pp\.randaug=\(2, 40\): M must be in \[0, 30\]; e\.g\. \(2, 10\)$"),
    ([2, 40], r"^config\.pp\.randaug=\(2, 40\): M must be in \[0, 30\]"),
    ((2, -1), r"M must be in \[0, 30\]"),
    ((2, float("nan")), r"M must be in \[0, 30\]"),
    ((2, "10"), r"M must be in \[0, 30\]"),
    ((2.5, 10), r"=\(2\.5, 10\): N must be an int >= 0"),
    ((-1, 10), r"N must be an int >= 0"),
    ((True, 10), r"N must be an int >= 0"),
    ((2,), r"=\(2,\): must be a pair \(N, M\)"),
    ((1, 2, 3), r"must be a pair \(N, M\)"),
    ("2,10", r"='2,10': must be a pair \(N, M\)"),
    (5, r"=5: must be a pair"),
])
def test_check_pp_rejects_bad_randaug(value, match):
  for pp in (dict(crop=8, randaug=value), ml_collections.ConfigDict(dict(crop=8, randaug=value))):
    if isinstance(pp, ml_collections.ConfigDict) and isinstance(value, list):
      continue  # a ConfigDict keeps lists as given; the dict case covers them
    with pytest.raises(UserError, match=match):
      preprocess.check_pp(pp)


def _record(seed=0):
  image = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  return {"image": image, "label": 1, "id": "x"}


@pytest.mark.parametrize("augment", sorted(preprocess.TRAIN_OPS))
def test_train_preprocess_applies_randaug_to_the_crop_after_its_draws(augment):
  record = _record()
  for seed in range(4):
    rng = np.random.default_rng(seed)
    crop = preprocess.TRAIN_OPS[augment](preprocess.decode(record["image"]), rng, 16)
    expected = preprocess.normalize(ra.rand_augment(crop, rng, 2, 10))
    pp = ml_collections.ConfigDict(dict(crop=16, augment=augment, randaug=(2, 10))).to_dict()
    got = preprocess.TrainPreprocess(pp)(record, np.random.default_rng(seed))
    np.testing.assert_array_equal(got["image"], expected)
    listed = preprocess.TrainPreprocess(dict(pp, randaug=[2, 10]))(record, np.random.default_rng(seed))
    np.testing.assert_array_equal(listed["image"], expected)  # tuples arriving as lists


def test_train_preprocess_without_randaug_is_unchanged():
  record = _record()
  for seed in range(4):
    before = preprocess.normalize(preprocess.inception_crop(preprocess.decode(record["image"]),
                                                            np.random.default_rng(seed), 16))
    for off in ({}, {"randaug": ()}, {"randaug": None}, {"randaug": (0, 10)}):
      got = preprocess.TrainPreprocess(dict(crop=16, **off))(record, np.random.default_rng(seed))
      np.testing.assert_array_equal(got["image"], before)
