"""Entry point: `python -m vit_jax.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]`.

Signal handling (`vit_jax.interrupts`) -> flags -> host set-up (CPU hosts only: `vit_jax.host`) -> the training
loop with the objective `config.trainer` names -> the training curves. SIGTERM exits 0 and SIGINT 130, after a
checkpoint of the current step once the loop runs, at once before. The config is locked: overriding a key it does
not have is an error. Every error a user can fix ends the program with one `error: ...` line and exit status 2.
"""
# First, and light: a SIGTERM or SIGINT during the slow imports below (seconds) already exits cleanly.
from vit_jax import interrupts

STOP = interrupts.StopSignals()
if __name__ == "__main__":
  STOP.install()

import functools
import logging as std_logging
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from vit_jax import distributed, host, objectives, train, workdir as workdir_lib
from vit_jax.errors import UserError, run_cli
from vit_jax.tools import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.npz.")
distributed.define_flags()


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


def run(argv, stop):
  # First, before anything touches a device: join the other processes of a multi-process run (no-op otherwise).
  multi_process = distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                         flags.FLAGS.process_id, timeout_s=flags.FLAGS.distributed_timeout_s,
                                         heartbeat_s=flags.FLAGS.distributed_heartbeat_s)
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
    host.split_cpu_devices(config.cpu_devices, **train.cpu_split_args(config))
  train.train_and_evaluate(config, _WORKDIR.value, stop=stop)
  _plot_curves(_WORKDIR.value)
  if stop.requested:  # stopped by a signal after saving: 0 for SIGTERM (preemption), 130 for SIGINT
    sys.exit(stop.exit_code)


def main():
  host.restart_with_fast_allocator()  # first: the new process starts over (and installs STOP again)
  parse = functools.partial(cli.parse_flags, hint="config keys are listed in configs/common.py and the config file")
  app.run(lambda argv: run_cli(run, argv, STOP), flags_parser=parse)


if __name__ == "__main__":
  main()
