"""Entry point: `python -m vit_jax.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]`.

Flags -> host set-up (CPU hosts only: `vit_jax.host`) -> the training loop with the objective `config.trainer`
names -> the training curves. The config is locked: overriding a key it does not have is an error. Every error a
user can fix ends the program with one `error: ...` line and exit status 2.
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from vit_jax import distributed, host, objectives, sharding, steps, train, workdir as workdir_lib
from vit_jax.errors import UserError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.npz.")
distributed.define_flags()


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # A misspelt `--config.key` (the config is locked) or a value of the wrong type surfaces here.
    detail = str(e.args[0] if e.args else e)
    detail = " ".join(detail.replace("\\n", " ").replace("\\", "").replace("'", "").split())
    print(f"error: bad command-line flag ({detail}); config keys are listed in configs/common.py and the config file",
          file=sys.stderr, flush=True)
    sys.exit(2)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO lines of orbax and jax (a dozen per checkpoint) so our progress and metrics stay readable."""
  _NOISY = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "jax"))

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(part in record.pathname for part in self._NOISY)


def _plot_curves(workdir):
  """curves.png of a completed run (process 0); a plot that cannot be drawn costs a warning, never the run."""
  from vit_jax.tools import visualize  # pylint: disable=g-import-not-at-top  (matplotlib only when plotting)
  if jax.process_index() != 0 or not os.path.exists(workdir_lib.path(workdir, workdir_lib.MODEL_FILE)):
    return
  try:
    visualize.plot_training_curves(workdir)
  except UserError as e:  # matplotlib is an optional extra
    logging.warning("No training curves: %s", e)


def run(argv):
  # First, before anything touches a device: join the other processes of a multi-process run (no-op otherwise).
  multi_process = distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                         flags.FLAGS.process_id, timeout_s=flags.FLAGS.distributed_timeout_s)
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value")
  if not _WORKDIR.value:
    raise UserError("--workdir is required; pass a directory, e.g. --workdir=runs/quickstart")
  if not flags.FLAGS["config"].present:
    raise UserError("--config is required; e.g. --config=configs/quickstart.py")
  try:
    config = _CONFIG.value
    trainer = config.get("trainer")
  except Exception as e:  # pylint: disable=broad-except  # the config file is missing or fails to load
    raise UserError(f"cannot load --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {e}") from None
  objectives.get(trainer)  # an unknown name fails here, before anything slow
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("Config:\n%s", config)
  if not multi_process:  # still before JAX creates its devices; a multi-process run keeps one CPU device each
    # Sizes the state copies of the CPU split; the head is an estimate (the dataset is not read yet).
    host.split_cpu_devices(
        config.cpu_devices,
        num_params=lambda: steps.count_params(train.create_model(config, 1000, "cpu"), config.pp.crop),
        batch_sizes=(config.batch // max(config.accum_steps, 1), config.batch_eval),
        mesh_sizes=[config.mesh[axis] for axis in sharding.MESH_AXES])
  train.train_and_evaluate(config, _WORKDIR.value)
  _plot_curves(_WORKDIR.value)


def main():
  host.restart_with_fast_allocator()  # first: the new process starts over
  app.run(lambda argv: run_cli(run, argv), flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
