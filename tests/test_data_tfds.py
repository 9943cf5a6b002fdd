"""TFDS sources without the network: `tfds.testing.mock_data`, and a tiny real ArrayRecord dataset."""
import io
import os
import socket
import subprocess
import sys
import time

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.tools import prepare_data as prepare
from vit_jax.errors import UserError


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


class VitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """10 train / 5 test images of varying sizes, given as PNG bytes (no TensorFlow needed to prepare)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _png(np.full((8 + i, 9, 3), i * 20, np.uint8)), "label": i % 3}


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def _config(dataset, data_dir=None, train="train", test="test", batch=8):
  return ml_collections.ConfigDict(dict(
      dataset=dataset, tfds_data_dir=data_dir, batch=batch, batch_eval=8, seed=0, num_workers=0, prefetch=1,
      pp=dict(train=train, test=test, crop=4, resize=None, augment="inception_crop", mixup=0.0)))


# The training loop's mapping from its config keys to the data functions' arguments.


def _info(c):
  return data.get_dataset_info(c.dataset, train_split=c.pp.train, test_split=c.pp.test,
                               tfds_data_dir=c.tfds_data_dir)


def _train(c, sharding):
  return data.make_train_iterator(dataset=c.dataset, split=c.pp.train, pp=c.pp, batch=c.batch, seed=c.seed,
                                  sharding=sharding, tfds_data_dir=c.tfds_data_dir, num_workers=c.num_workers,
                                  prefetch=c.prefetch)


def _eval(c, sharding):
  return data.make_eval_iterator(dataset=c.dataset, split=c.pp.test, pp=c.pp, batch=c.batch_eval,
                                 sharding=sharding, tfds_data_dir=c.tfds_data_dir, num_workers=c.num_workers,
                                 prefetch=c.prefetch)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = prepare.prepare("vit_jax_tiny_images", data_dir)
  assert builder.is_prepared()
  return data_dir


def test_mock_data_cifar10_through_data_source():
  def as_data_source(builder, split, decoders=None, deserialize_method=None):
    del builder, decoders, deserialize_method
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    n = {"train": 20, "test": 13}[split]
    return [{"image": _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "label": i % 10, "id": b""}
            for i in range(n)]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    cfg = _config("cifar10")
    info = _info(cfg)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 20, 13)
    assert len(info.class_names) == 10
    batch = next(_train(cfg, _sharding()))
    assert batch["image"].shape == (8, 4, 4, 3) and batch["label"].dtype == np.int32
    masks = [np.asarray(b["mask"]) for b in _eval(cfg, _sharding())]
    assert len(masks) == 2 and sum(m.sum() for m in masks) == 13


def test_real_array_record_slicing_and_exact_eval(tiny_dir):
  cfg = _config("vit_jax_tiny_images", tiny_dir, train="train[:80%]", test="train[80%:]+test", batch=8)
  info = _info(cfg)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 8, 7)
  batch = next(_train(cfg, _sharding()))
  assert batch["image"].shape == (8, 4, 4, 3)
  labels = []
  for b in _eval(cfg, _sharding()):
    labels += [int(l) for l, m in zip(np.asarray(b["label"]), np.asarray(b["mask"])) if m]
  # In order, exactly once each (TFDS shuffles records when it writes them, so ask TFDS for the order).
  expected = tfds.data_source("vit_jax_tiny_images", split="train[80%:]+test", data_dir=tiny_dir)
  assert labels == [int(ex["label"]) for ex in expected]


def test_tfds_errors(tiny_dir, tmp_path):
  with pytest.raises(UserError, match=r"Unknown split 'val'.*train"):
    _info(_config("vit_jax_tiny_images", tiny_dir, test="val"))
  # Not prepared: fail at once (no download) with the exact command.
  with pytest.raises(UserError, match=f"python -m vit_jax.tools.prepare_data --dataset=cifar10 --tfds_data_dir={tmp_path}"):
    _info(_config("cifar10", str(tmp_path)))
  with pytest.raises(UserError, match="Did you mean: cifar10"):
    _info(_config("cifar1O", str(tmp_path)))


@pytest.mark.slow
def test_prepare_cli_unknown_dataset_exits_2():
  proc = subprocess.run([sys.executable, "-m", "vit_jax.tools.prepare_data", "--dataset=no_such_dataset_xyz"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "no_such_dataset_xyz" in lines[0]


# A machine without a network: every name lookup fails, as it does offline (the probe's and TFDS's own).
_OFFLINE_PREPARE = """
import runpy, socket, sys
def no_network(*args, **kwargs):
  raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = no_network
sys.argv = ["prepare_data", *sys.argv[1:]]
runpy.run_module("vit_jax.tools.prepare_data", run_name="__main__")
"""


@pytest.mark.slow
def test_prepare_cli_offline_fails_fast_with_the_manual_download(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # the probe runs without a proxy
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", _OFFLINE_PREPARE, "--dataset=cifar10", f"--tfds_data_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=120, env=env)
  seconds = time.monotonic() - start
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1]
  assert lines[0].startswith("error: downloading 'cifar10' failed (cannot reach www.cs.toronto.edu: ")
  assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in lines[0]
  assert f"put them in {tmp_path}/downloads/manual (TFDS's manual dir; --manual_dir=DIR" in lines[0]
  assert seconds < 60  # TFDS's own 10 retries with back-off take minutes


def test_unreachable_hosts_probes_each_host_once_and_not_behind_a_proxy(monkeypatch):
  for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
    monkeypatch.delenv(name)
  probed = []

  def connect(address, timeout):
    probed.append((address, timeout))
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "create_connection", connect)
  urls = ["https://a.example/x.tar", "https://a.example/y.tar", "http://b.example:8080/z", "gs://bucket/file"]
  reason = f"[Errno {socket.EAI_NONAME}] Name or service not known"
  assert prepare.unreachable_hosts(urls, timeout_s=2) == {"a.example": reason, "b.example": reason}
  assert probed == [(("a.example", 443), 2), (("b.example", 8080), 2)]
  monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
  assert prepare.unreachable_hosts(urls) == {}  # downloads go through the proxy: a direct probe proves nothing
