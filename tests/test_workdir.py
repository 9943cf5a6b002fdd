"""The workdir under faults: damaged checkpoints, a second run, a full disk, changed settings on resume, damaged
metrics and TensorBoard points of re-done steps."""
import errno
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax import steps, train, workdir as workdir_lib
from vit_jax.errors import UserError
from vit_jax.metrics_writer import MetricsWriter

from tests.test_train import read_metrics, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  return tiny_config(**{"total_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5, **overrides})


def _losses(workdir):
  return [(r["step"], r.get("train_loss"), r.get("learning_rate"), r.get("test_loss")) for r in read_metrics(workdir)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A complete 6-step run with checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(_config(), workdir)
  return workdir


def _copy_without_model(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  os.remove(os.path.join(workdir, workdir_lib.MODEL_FILE))
  return workdir


# --- damaged checkpoints ----------------------------------------------------------------------------------------


def _truncate_array_files(step_dir):
  """Cuts every data file of the state's OCDBT databases (the per-process ones and the merged one) to half."""
  for data_file in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 2)


def _write(text, *parts):
  with open(os.path.join(*parts), "w", encoding="utf-8") as f:
    f.write(text)


DAMAGES = {
    "truncated array files": _truncate_array_files,
    "missing manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "missing extra": lambda d: shutil.rmtree(os.path.join(d, "extra")),
    "empty step folder": lambda d: (shutil.rmtree(d), os.mkdir(d)),
    "corrupt state metadata": lambda d: _write("{garbage", d, "state", "_METADATA"),
    "corrupt extra": lambda d: _write("{not json", d, "extra", "metadata"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(finished, tmp_path, damage):
  workdir = _copy_without_model(finished, tmp_path)
  DAMAGES[damage](os.path.join(workdir, "checkpoints", "6"))
  train.train_and_evaluate(_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6", "6.corrupt"]
  assert _losses(workdir) == _losses(finished)  # resumed from step 3, steps 4-6 redone bit for bit
  assert os.path.exists(os.path.join(workdir, workdir_lib.MODEL_FILE))


@pytest.mark.slow
def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_says_what_to_do(finished, tmp_path):
  workdir = _copy_without_model(finished, tmp_path)
  for step in ("3", "6"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "manifest.ocdbt"))
  with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints can be restored \(step 6: .*step 3: .*move "
                                      r"that folder aside to start over"):
    train.train_and_evaluate(_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


# --- settings on resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_recovery_keys_may_change_on_resume_and_total_steps_may_not_fall_below_the_checkpoint(finished, tmp_path):
  workdir = _copy_without_model(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  train.train_and_evaluate(_config(base_lr=5e-4, warmup_steps=1, grad_norm_clip=0.0, total_steps=8), workdir)
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6, 8]
  assert _losses(workdir)[:2] == _losses(finished)[:2]  # steps up to the checkpoint are kept as they were
  assert records[-1]["learning_rate"] != read_metrics(finished)[-1]["learning_rate"]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["base_lr"] == 5e-4
  with pytest.raises(UserError, match=r"total_steps=4 is below step 8 of the checkpoint"):
    train.train_and_evaluate(_config(base_lr=5e-4, warmup_steps=1, grad_norm_clip=0.0, total_steps=4), workdir)


def test_a_run_written_before_the_recipe_keys_resumes_with_them_off(tmp_path):
  old = json.loads(_config().to_json())
  for key in workdir_lib.ADDED_KEYS:  # as config.json was written before these keys existed
    *parents, leaf = key.split(".")
    section = old
    for parent in parents:
      section = section[parent]
    section.pop(leaf, None)
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(old, f)
  workdir_lib.check_config(_config(), str(tmp_path))  # the keys at their defaults: the same computation
  config = _config(ema_decay=0.9)
  config.pp.randaug = (2, 5)
  with pytest.raises(UserError, match=r"different config: ema_decay \(was 0.0, now 0.9\), pp.randaug \(was \[\], "
                                      r"now \[2, 5\]\)"):
    workdir_lib.check_config(config, str(tmp_path))


def test_learning_rate_factors_may_change_on_resume_to_unfreeze(tmp_path):
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    f.write(_config(lr_mults=((".*", 0.0),), layer_decay=0.5).to_json())
  workdir_lib.check_config(_config(), str(tmp_path))  # logged, not refused: the state is the same


def test_a_checkpoint_written_before_the_ema_field_restores_without_it(tmp_path):
  @flax.struct.dataclass
  class OldTrainState:  # the train state before `ema_params`, saved as that code saved it
    step: jax.Array
    params: dict
    opt_state: tuple
    rng: jax.Array

  manager = workdir_lib.checkpoint_manager(str(tmp_path), keep=2, platform="cpu")
  old = OldTrainState(step=jnp.int32(3), params={"w": jnp.arange(3.0)}, opt_state=(), rng=jax.random.PRNGKey(7))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave(old), extra=ocp.args.JsonSave({"data": 1})))
  manager.wait_until_finished()
  new = steps.TrainState(step=jnp.int32(0), params={"w": jnp.zeros(3)}, opt_state=(), rng=jax.random.PRNGKey(0))
  state, extra = workdir_lib.restore_checkpoint(manager, 3, new)
  manager.close()
  assert isinstance(state, steps.TrainState) and state.ema_params is None and extra == {"data": 1}
  np.testing.assert_array_equal(state.params["w"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(7))


def test_a_corrupt_config_json_is_an_error_saying_how_to_resume(tmp_path):
  with open(tmp_path / "config.json", "wb") as f:
    f.write(b"\xff\xfe{")
  with pytest.raises(UserError, match=r"cannot read .*config.json .*delete it to resume with the config you pass"):
    workdir_lib.check_config(_config(), str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    ({"base_lr": 0.0}, "base_lr=0.0 must be positive"),
    ({"base_lr": -1e-3}, "base_lr=-0.001 must be positive"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing=-0.1 must be in \[0, 1\)"),
    ({"momentum": 1.5}, r"momentum=1.5 must be in \[0, 1\)"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0 must be 0"),
    ({"grad_norm_clip": -1.0}, "grad_norm_clip=-1.0 must be 0"),
    ({"peak_flops": 0.0}, "peak_flops=0.0 must be positive"),
    ({"crop_stages": ((-1, 16),)}, r"crop_stages entry \(-1, 16\) must be"),
    ({"model": {"transformer": {"dropout_rate": 1.0}}}, r"dropout_rate=1.0 must be in \[0, 1\)"),
    ({"model": {"hidden_size": 0}}, "hidden_size=0 must be at least 1"),
])
def test_nonsense_values_are_refused_before_anything_is_written(tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(_config(**overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_warmup_longer_than_the_run_is_a_warning_that_says_what_it_means(caplog):
  train.make_optimizer(_config(warmup_steps=12))
  assert "rises to only 0.5 of base_lr" in caplog.text


# --- one run per workdir ----------------------------------------------------------------------------------------

_HOLD = ("import sys, time\nfrom vit_jax import workdir\nwith workdir.locked(sys.argv[1]):\n"
         "  print('held', flush=True)\n  time.sleep(600)\n")


def test_a_second_run_in_a_live_workdir_is_refused_and_a_dead_holder_never_blocks(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"in use by another run \(host .*, pid {holder.pid}, started .*lock file"):
      with workdir_lib.locked(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.locked(str(tmp_path)):  # the lock file stays behind, the lock died with its holder
    with open(tmp_path / "lock", encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()


# --- full disk --------------------------------------------------------------------------------------------------


def test_a_full_disk_fails_the_start_up_checks(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000))
  with pytest.raises(UserError, match=r"has 0.0 MiB free, but one checkpoint and model.npz need about [\d.]+ MiB"):
    train.train_and_evaluate(_config(), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert workdir_lib.is_disk_full(OSError(28, "No space left on device"))
  assert workdir_lib.is_disk_full(ValueError("tensorstore: ... No space left on device [errno 28]"))


@pytest.fixture
def small_disk(tmp_path):
  """A 1.5 MiB tmpfs (root only; skipped elsewhere)."""
  mount = tmp_path / "small"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_save_on_a_full_disk_ends_with_an_error_and_keeps_the_older_checkpoint(small_disk, finished):
  workdir = str(small_disk / "run")
  # Room for one checkpoint and model.npz at start-up; a filler takes what the second checkpoint would need.
  os.makedirs(workdir)
  with pytest.raises(UserError, match=r"disk full writing to .*run \(.* free, about .* needed\).*the older "
                                      r"checkpoints in .*checkpoints are kept"):
    _train_filling(workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  os.remove(os.path.join(small_disk, "filler"))
  train.train_and_evaluate(_config(), workdir)  # space freed: resumes from step 3
  assert _losses(workdir) == _losses(finished)


def _train_filling(workdir):
  """Trains with a filler file that grows to fill the disk once the first checkpoint is written."""
  filler = os.path.join(os.path.dirname(workdir), "filler")
  original = workdir_lib.save_checkpoint

  def save_then_fill(manager, step, state, extra):
    if step > 3:
      manager.wait_until_finished()
      with open(filler, "wb") as f:
        try:
          while True:
            f.write(b"\0" * 4096)
            f.flush()
        except OSError:
          pass
    original(manager, step, state, extra)

  workdir_lib.save_checkpoint = save_then_fill
  try:
    train.train_and_evaluate(_config(), workdir)
  finally:
    workdir_lib.save_checkpoint = original


# --- metrics ----------------------------------------------------------------------------------------------------


def test_resumed_metrics_drop_later_steps_skip_damaged_lines_and_get_back_the_checkpoint_record(tmp_path):
  records = [{"step": 2, "train_loss": 2.0}, {"step": 4, "train_loss": 1.5}, {"step": 6, "train_loss": 1.0}]
  with open(tmp_path / "metrics.jsonl", "wb") as f:
    f.write(json.dumps(records[0]).encode() + b"\n")
    f.write(b'{"step": 4, "train_lo\xff\xfe\n')  # the checkpoint step's record, damaged
    f.write(json.dumps(records[2]).encode() + b"\n")  # after the checkpoint: redone on resume
    f.write(b'{"step": 8, "tr')  # cut by a kill
  assert workdir_lib.read_metrics(str(tmp_path)) == [records[0], records[2]]
  writer = MetricsWriter(str(tmp_path), resume_step=4)
  writer.restore(4, [records[1]])  # what the checkpoint of step 4 kept
  writer.close()
  assert workdir_lib.read_metrics(str(tmp_path)) == records[:2]


def _tensorboard_points(workdir):
  """(tag, step) -> values as TensorBoard shows them: a SessionLog START at step s drops the points at s and later
  of files read before it (TensorBoard's purge of orphaned data), files read in name order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  points = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        points = {key: value for key, value in points.items() if key[1] < event.step}
      for value in event.summary.value:
        points.setdefault((value.tag, event.step), []).append(value.simple_value)
  return points


@pytest.mark.slow
def test_tensorboard_shows_redone_steps_once(finished, tmp_path):
  workdir = _copy_without_model(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  time.sleep(1.1)  # a new event file name (its name holds the time in seconds)
  train.train_and_evaluate(_config(), workdir)
  points = _tensorboard_points(workdir)
  assert all(len(values) == 1 for values in points.values()), sorted(k for k, v in points.items() if len(v) > 1)
  assert [step for tag, step in sorted(points) if tag == "train_loss"] == [2, 4, 6]


# --- an error in the loop -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_error_after_some_steps_saves_them_first(finished, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  calls = []

  def failing_evaluate(*args, **kwargs):
    calls.append(1)
    raise UserError("the evaluator failed")
  monkeypatch.setattr(train.classification, "evaluate", failing_evaluate)
  with pytest.raises(UserError, match="the evaluator failed"):
    train.train_and_evaluate(_config(checkpoint_every=0), workdir)  # checkpoints only at the end
  assert calls and os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]  # the eval of step 3 failed
  monkeypatch.undo()
  train.train_and_evaluate(_config(checkpoint_every=0), workdir)
  train_losses = lambda w: [(step, loss) for step, loss, _, _ in _losses(w) if loss is not None]
  assert train_losses(workdir) == train_losses(finished)


@pytest.mark.slow
def test_a_failed_save_or_metrics_write_on_a_full_disk_is_one_error_keeping_what_was_saved(finished, tmp_path,
                                                                                             monkeypatch):
  """Without a tmpfs: the writes themselves fail with ENOSPC."""
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  original_save = workdir_lib.save_checkpoint
  monkeypatch.setattr(workdir_lib, "save_checkpoint", lambda manager, step, *a: (
      full() if step > 3 else original_save(manager, step, *a)))
  workdir = str(tmp_path / "save")
  with pytest.raises(UserError, match=r"disk full writing to .*save .*No space left on device; the older "
                                      r"checkpoints in .*checkpoints are kept"):
    train.train_and_evaluate(_config(), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  monkeypatch.undo()

  original_write = MetricsWriter.write
  monkeypatch.setattr(MetricsWriter, "write", lambda self, step, metrics: (
      full() if step == 4 else original_write(self, step, metrics)))
  workdir = str(tmp_path / "metrics")
  with pytest.raises(UserError, match="disk full writing to"):
    train.train_and_evaluate(_config(), workdir)
  # The steps since the last checkpoint were saved after the error, their metrics pending in it.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
  monkeypatch.undo()
  train.train_and_evaluate(_config(), workdir)
  assert [r["step"] for r in read_metrics(workdir) if "train_loss" in r] == [2, 6]
