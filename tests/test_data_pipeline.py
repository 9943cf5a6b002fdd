"""Pipelines on `digits` and on an image folder: shapes, determinism, resume, exact eval, errors."""
import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest

from vit_jax import data
from vit_jax.data import preprocess
from vit_jax.errors import UserError


def _sharding():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  return NamedSharding(mesh, P(("data", "fsdp")))


def _config(**overrides):
  """A training config's data keys; `pp` a plain dict, as any mapping works."""
  pp = dict(train="train", test="test", crop=16, resize=None, augment="affine", mixup=0.0)
  pp.update(overrides.pop("pp", {}))
  c = dict(dataset="digits", tfds_data_dir=None, pp=pp, batch=32, batch_eval=64, seed=0, num_workers=0,
           prefetch=2)
  c.update(overrides)
  return c


# The training loop's mapping from its config keys to the data functions' arguments.


def _info(c):
  return data.get_dataset_info(c["dataset"], train_split=c["pp"]["train"], test_split=c["pp"]["test"],
                               tfds_data_dir=c["tfds_data_dir"])


def _train(c, sharding, **kw):
  return data.make_train_iterator(
      dataset=c["dataset"], split=c["pp"]["train"], pp=c["pp"], batch=c["batch"], seed=c["seed"],
      sharding=sharding, tfds_data_dir=c["tfds_data_dir"], num_workers=c["num_workers"], prefetch=c["prefetch"],
      **kw)


def _eval(c, sharding, **kw):
  return data.make_eval_iterator(
      dataset=c["dataset"], split=c["pp"]["test"], pp=c["pp"], batch=c["batch_eval"], sharding=sharding,
      tfds_data_dir=c["tfds_data_dir"], num_workers=c["num_workers"], prefetch=c["prefetch"], **kw)


def _take(it, n):
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_digits_info_and_train_batches():
  info = _info(_config())
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1437, 360)
  it = _train(_config(), _sharding())
  batch = next(it)
  assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert batch["image"].sharding == _sharding()
  image = np.asarray(batch["image"])
  assert image.min() >= -1 and image.max() <= 1 and image.min() == -1  # black background
  # Stratified split: every class in the test split, ~36 each.
  counts = np.bincount(np.concatenate([np.asarray(b["label"]) for b in _eval(
      _config(), _sharding())]), minlength=10)
  assert counts.min() >= 30


def test_determinism_by_seed_and_resume_with_prefetch():
  a = _train(_config(), _sharding())
  b = _train(_config(), _sharding())
  c = _train(_config(seed=1), _sharding())
  first_a, first_b, first_c = _take(a, 3), _take(b, 3), _take(c, 3)
  assert _equal(first_a, first_b) and not _equal(first_a, first_c)
  state = a.get_state()
  import json  # pylint: disable=g-import-not-at-top
  state = json.loads(json.dumps(state))  # what a checkpoint does to it
  # Past one epoch (1437 / 32 = 44 batches): reshuffled, and still replayed exactly.
  expected = _take(a, 50)
  b.set_state(state)
  assert _equal(_take(b, 50), expected)
  fresh = _train(_config(), _sharding())
  fresh.set_state(state)
  assert _equal(_take(fresh, 5), expected[:5])


@pytest.mark.slow
def test_resume_with_a_worker_process_and_mixup():
  cfg = _config(num_workers=1, batch=16, pp=dict(mixup=0.5, augment="inception_crop"))
  it = _train(cfg, _sharding())
  first = _take(it, 2)
  assert first[0]["label"].shape == (16, 10) and first[0]["label"].dtype == np.float32
  np.testing.assert_allclose(first[0]["label"].sum(1), 1, rtol=1e-5)
  state = it.get_state()
  expected = _take(it, 3)
  it.set_state(state)
  assert _equal(_take(it, 3), expected)
  it.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_exact_eval_partial_last_batch(processes):
  cfg = _config(batch_eval=48)  # 360 = 7 * 48 + 24: the last global batch is half padding
  cfg["pp"] = ml_collections.ConfigDict(cfg["pp"])  # a ConfigDict works as well as a dict
  src = data.open_source("digits", "test")
  pre = preprocess.EvalPreprocess(cfg["pp"])
  expected = sorted((int(r["label"]), float(pre(r)["image"].sum())) for r in (src[i] for i in range(len(src))))
  seen, steps = [], []
  for p in range(processes):
    batches = [jax.tree.map(np.asarray, b) for b in _eval(
        cfg, _sharding(), process_index=p, process_count=processes)]
    steps.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 48 // processes
      for image, label, mask in zip(b["image"], b["label"], b["mask"]):
        if mask:
          seen.append((int(label), float(image.sum())))
  assert steps == [8] * processes  # every process runs the same number of steps
  assert len(seen) == 360
  np.testing.assert_allclose(np.array(sorted(seen)), np.array(expected), rtol=1e-5)


def test_global_batches_do_not_depend_on_the_process_count():
  """Two simulated processes load the two halves of the very batches one process loads, and resume alike."""
  one = _take(_train(_config(), _sharding()), 46)  # past the first epoch (44 batches)
  halves = [_train(_config(), _sharding(), process_index=p, process_count=2) for p in range(2)]
  for step, batch in enumerate(one[:3]):
    local = [jax.tree.map(np.asarray, next(it)) for it in halves]
    assert local[0]["image"].shape == (16, 16, 16, 3)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([local[0][key], local[1][key]]), batch[key], err_msg=str(step))
  # The state written by one process (a count of global batches) resumes the other topology exactly.
  state = {"batches": 44}
  for p, it in enumerate(halves):
    it.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(it)["label"]), one[44]["label"][16 * p:16 * (p + 1)])


def test_split_slicing_and_bad_inputs():
  cfg = _config(pp=dict(train="train[:10%]", test="train[10%:]"))
  info = _info(cfg)
  assert info.num_train_examples + info.num_eval_examples == 1437
  with pytest.raises(UserError, match="Unknown split 'validation'"):
    _info(_config(pp=dict(test="validation")))
  with pytest.raises(UserError, match="number of processes"):
    _train(_config(batch=33), _sharding(), process_index=0, process_count=2)
  with pytest.raises(UserError, match="8 data-parallel devices"):
    _train(_config(batch=12), _sharding())
  with pytest.raises(UserError, match="pp.augment"):
    _train(_config(pp=dict(augment="randaugment")), _sharding())
  with pytest.raises(UserError, match=r"config\.pp\.crop=None must be a positive int"):
    data.make_eval_iterator(dataset="digits", split="test", pp={}, batch=64, sharding=_sharding())
  with pytest.raises(UserError, match=r"lower config\.batch\b"):
    _train(_config(pp=dict(train="train[:1%]")), _sharding())  # 14 examples, batch 32
  with pytest.raises(UserError, match="config.dataset"):
    _info(_config(dataset=None))


def test_errors_name_the_batch_setting_the_user_wrote():
  with pytest.raises(UserError, match=r"^config\.batch=12 is not divisible by the 8 data-parallel"):
    _train(_config(batch=12), _sharding())
  with pytest.raises(UserError, match=r"^config\.batch_eval=12 is not divisible by the 8 data-parallel"):
    _eval(_config(batch_eval=12), _sharding())
  with pytest.raises(UserError, match=r"^--batch_size=12 is not divisible by the 8 data-parallel"):
    _eval(_config(batch_eval=12), _sharding(), batch_key="--batch_size")
  with pytest.raises(UserError, match=r"^config\.batch_eval=0 must be a positive int"):
    data.host_eval_dataset(dataset="digits", split="test", pp=dict(crop=8), batch=0)


def test_minimal_pp_takes_the_defaults():
  """Only `crop` given (a plain dict): inception crop, no mixup, resize straight to crop, skip-and-count."""
  pp = {"crop": 8}
  it = data.make_train_iterator(dataset="digits", split="train", pp=pp, batch=32, seed=0, sharding=_sharding())
  batch = next(it)
  assert batch["image"].shape == (32, 8, 8, 3) and batch["label"].dtype == np.int32
  it.close()
  masks = [np.asarray(b["mask"]) for b in data.make_eval_iterator(
      dataset="digits", split="test", pp=pp, batch=64, sharding=_sharding())]
  assert sum(m.sum() for m in masks) == 360


def test_train_iterator_opens_its_source_once(monkeypatch):
  """The epoch size and every resume point come from the one opened source (no second host dataset)."""
  opened = []
  real = data.sources.open_source
  monkeypatch.setattr(data.sources, "open_source", lambda *a, **kw: opened.append(a) or real(*a, **kw))
  it = _train(_config(), _sharding())
  first = _take(it, 2)
  it.set_state({"batches": 0})
  assert _equal(_take(it, 2), first)
  assert opened == [("digits", "train")]
  it.close()


def test_host_datasets_without_devices():
  ds, epoch = data.host_train_dataset(dataset="digits", split="train", pp=dict(crop=8), batch=32, seed=0,
                                      process_index=1, process_count=2)
  assert epoch == 1437 // 2
  assert next(iter(ds))["image"].shape == (16, 8, 8, 3)
  ds, steps = data.host_eval_dataset(dataset="digits", split="test", pp=dict(crop=8), batch=48, process_index=0,
                                     process_count=2)
  batches = list(ds)
  assert steps == len(batches) == 8 and batches[0]["mask"].shape == (24,)


def _host_batch(pp, seed=0):
  ds, _ = data.host_train_dataset(dataset="digits", split="train", pp=pp, batch=32, seed=seed, process_index=0,
                                  process_count=1)
  return next(iter(ds))


@pytest.mark.parametrize("mix", [dict(mixup=0.5), dict(cutmix=1.0), dict(mixup=0.5, cutmix=1.0, mix_switch_prob=0.7)])
def test_batch_mixing_is_the_batch_op_with_the_batch_seeded_generator(mix):
  """Mixup alone is exactly what the pipeline did before cutmix; cutmix and the switch draw from the same
  generator, seeded by the seed and the batch's first global position (so resumes replay them)."""
  plain = _host_batch(dict(crop=8, augment="none"))
  mixed = _host_batch(dict(crop=8, augment="none", **mix))
  seed = data.pipeline._seed(0)  # pylint: disable=protected-access
  rng = np.random.default_rng([seed, int(plain["_position"][0]), 2])
  if set(mix) == {"mixup"}:
    expected = preprocess.Mixup(0.5, 10)(plain, rng)
  else:
    expected = preprocess.MixBatch(mix.get("mixup", 0.0), 1.0, mix.get("mix_switch_prob", 0.5), 10)(plain, rng)
  for key in ("image", "label"):
    np.testing.assert_array_equal(mixed[key], expected[key])
  assert mixed["label"].shape == (32, 10)


def test_randaug_and_cutmix_are_deterministic_and_resume_exactly():
  cfg = _config(pp=dict(augment="inception_crop", randaug=[2, 10], mixup=0.2, cutmix=1.0))  # lists, as to_dict()
  a, b = _train(cfg, _sharding()), _train(cfg, _sharding())
  first = _take(a, 2)
  assert _equal(first, _take(b, 2))
  without = _take(_train(_config(pp=dict(augment="inception_crop", mixup=0.2, cutmix=1.0)), _sharding()), 2)
  assert not np.array_equal(first[0]["image"], without[0]["image"])
  np.testing.assert_array_equal(first[0]["label"], without[0]["label"])  # randaug leaves the mixing draws alone
  state = a.get_state()
  expected = _take(a, 3)
  b.set_state(state)
  assert _equal(_take(b, 3), expected)
  a.close()
  b.close()
  with pytest.raises(UserError, match=r"config\.pp\.randaug=\(2, 40\): M must be in \[0, 30\]"):
    _train(_config(pp=dict(randaug=(2, 40))), _sharding())
  with pytest.raises(UserError, match=r"config\.pp\.mix_switch_prob=2 must be in \[0, 1\]"):
    _train(_config(pp=dict(cutmix=1.0, mix_switch_prob=2)), _sharding())


# ------------------------------------------------------------------------------------- image folder


def _write(path, array, fmt, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path, fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  rng = np.random.default_rng(0)
  for split, n in [("train", 6), ("val", 5)]:
    for i in range(n):
      _write(f"{root}/{split}/cat/{i}.jpg", rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8), "JPEG")
      _write(f"{root}/{split}/dog/{i}.png", rng.integers(0, 256, (40, 30 + i), dtype=np.uint8), "PNG")  # grey
    _write(f"{root}/{split}/dog/rgba.png", rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "PNG")
    with open(f"{root}/{split}/cat/corrupt.jpg", "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  open(f"{root}/train/cat/notes.txt", "w").close()  # not an image: ignored
  os.makedirs(f"{root}/empty/cat")
  return root


def _folder_config(root, pp=None, **kw):
  pp = dict(dict(train="train", test="val", augment="inception_crop"), **(pp or {}))
  return _config(dataset=root, pp=pp, batch=8, batch_eval=8, **kw)


def test_folder_train_skips_and_counts_corrupt(folder):
  info = _info(_folder_config(folder))
  assert info.class_names == ("cat", "dog") and info.num_train_examples == 14
  it = _train(_folder_config(folder), _sharding())
  labels = np.concatenate([np.asarray(b["label"]) for b in _take(it, 5)])  # 40 examples, ~3 epochs
  assert set(labels) == {0, 1}
  assert it.num_skipped >= 2  # the corrupt file, once per epoch seen
  strict = _train(_folder_config(folder, pp=dict(strict=True)), _sharding())
  with pytest.raises(UserError, match="corrupt.jpg"):
    _take(strict, 5)
  # The `strict` argument overrides pp's strict.
  assert _take(_train(_folder_config(folder, pp=dict(strict=True)), _sharding(), strict=False), 5)
  with pytest.raises(UserError, match="corrupt.jpg"):
    list(_eval(_folder_config(folder), _sharding(), strict=True))


def test_folder_eval_masks_corrupt_and_pads(folder):
  batches = [jax.tree.map(np.asarray, b) for b in _eval(_folder_config(folder), _sharding())]
  assert len(batches) == 2  # 12 files -> 16 slots
  assert sum(b["mask"].sum() for b in batches) == 11  # 12 files, one corrupt (masked out, counted)
  assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)


def test_folder_errors(folder, tmp_path):
  with pytest.raises(UserError, match="no images"):
    _info(_folder_config(folder, pp=dict(test="empty")))
  with pytest.raises(UserError, match="Unknown split 'test'"):
    _info(_folder_config(folder, pp=dict(test="test")))
  os.makedirs(tmp_path / "train")
  with pytest.raises(UserError, match="no class folders"):
    _info(_folder_config(str(tmp_path)))
  with pytest.raises(UserError, match="not a directory"):
    _info(_folder_config(str(tmp_path / "missing")))


def test_epoch_orders_are_safe_under_concurrent_reader_threads():
  """Reader threads ask for epoch orders at once (a batch as large as its split spans epochs): each gets its
  epoch's permutation, none a KeyError from another thread's cache eviction (a run died of that)."""
  import sys  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  record = pipeline._TrainRecord(list(range(50)), None, seed=3, global_batch=50, local_batch=50, process_index=0)
  expected = {e: np.random.default_rng([3, e]).permutation(50) for e in range(40)}
  errors, interval = [], sys.getswitchinterval()

  def read(thread):
    rng = np.random.default_rng(thread)
    try:
      for _ in range(1500):  # the old check-then-pop failed this in 5 of 5 trials
        epoch = int(rng.integers(0, 40))
        assert np.array_equal(record.order(epoch), expected[epoch])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  sys.setswitchinterval(1e-6)  # switch threads as often as possible
  try:
    threads = [threading.Thread(target=read, args=(t,)) for t in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert not errors, errors[:3]
  assert len(record._orders) <= 8  # bounded: the newest three plus what threads add at the same moment


def test_a_batch_of_the_whole_split_is_each_epoch_once():
  config = _config(pp={"train": "train_10_per_class", "augment": "none"}, batch=100)
  four = NamedSharding(Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("data", "fsdp")), P(("data", "fsdp")))
  it = _train(config, four, read_threads=2)
  for batch in _take(it, 6):
    assert (np.bincount(batch["label"], minlength=10) == 10).all()
