"""Smoke test of a multi-process launch: join the processes, then all-reduce and all-gather over every device.

  launch/local.sh 2 --module=vit_jax.tools.check_distributed

Prints one JSON line per process (`vit_jax.distributed.check_cross_process_collectives`).
"""
import json

from absl import flags

from vit_jax import distributed
from vit_jax.tools import cli

FLAGS = flags.FLAGS


def main():
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         timeout_s=FLAGS.distributed_timeout_s, heartbeat_s=FLAGS.distributed_heartbeat_s)
  print(json.dumps(distributed.check_cross_process_collectives()), flush=True)


if __name__ == "__main__":
  distributed.define_flags()
  cli.run(main)
