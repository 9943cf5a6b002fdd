"""Device mesh, parameter sharding rules and batch sharding.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism whose replicas also
shard the large kernels and their optimizer state) and `tensor` (attention heads and MLP hidden units split
across devices, Megatron style). The batch is split over `data` x `fsdp`.

Parameter shardings come from regex rules over '/'-joined parameter paths (big_vision style), so the model code
stays free of sharding annotations. The same rules apply to optimizer state, whose leaves carry the parameter
path as a suffix (e.g. `opt_state/1/0/mu/Transformer/.../query/kernel`). A dimension is only sharded when the
mesh axis divides it; anything unmatched is replicated.
"""
import re
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.errors import UserError
from vit_jax import models

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex over the '/'-joined parameter path, PartitionSpec); the first match wins. Each model family states its
# own rules beside its modules; `vit_jax.models` collects them.
PARAM_RULES = models.SHARDING_RULES


_SCANNED_BLOCK = re.compile(r"(^|/)encoderblock/")


def resolve_mesh_sizes(mesh_config, num_devices=None) -> dict:
  """{'data', 'fsdp', 'tensor'} sizes of `mesh_config` (a mapping; missing axes are 1) with its one -1 resolved
  against `num_devices`; a UserError naming the sizes when they do not fit the devices."""
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  described = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f"invalid mesh ({described}); use positive sizes and at most one -1")
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices is None:
      raise UserError(f"mesh.{free[0]}=-1 needs the device count (--devices, the total number of chips) to resolve")
    if num_devices % known:
      raise UserError(f"mesh ({described}) cannot use {num_devices} devices: {known} does not divide "
                      f"{num_devices}; choose sizes whose product divides the device count")
    sizes[free[0]] = num_devices // known
  elif num_devices is not None and known != num_devices:
    raise UserError(f"mesh sizes ({described}) multiply to {known} but there are {num_devices} devices; make "
                    f"them multiply to {num_devices} or set one to -1")
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 to take the devices the others
  leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_sizes(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  # Physical order matters on TPU/GPU (tensor axis on the fastest links): let JAX pick it when we use all devices.
  if len(devices) == len(jax.devices()):
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Dimension 0 split over every data-parallel axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def check_divisible(name: str, size: int, *, shards: int, processes: int, accum_steps: int = 1):
  """UserError naming `name` unless every process and every data-parallel device gets an equal share of each
  (micro)batch of `size`: the one batch-divisibility rule (training, the data pipeline, the tools)."""
  if size % accum_steps:
    raise UserError(f"{name}={size} is not divisible by accum_steps={accum_steps}; use a multiple of {accum_steps}")
  micro = size // accum_steps
  for count, what in ((processes, f"the number of processes ({processes})"),
                      (shards, f"the {shards} data-parallel devices (mesh.data x mesh.fsdp)")):
    if micro % count:
      per = f"{name}/accum_steps={micro}" if accum_steps > 1 else f"{name}={size}"
      raise UserError(f"{per} is not divisible by {what}; use a multiple of {count * accum_steps}")


def check_batch_size(name: str, size: int, mesh: Mesh, accum_steps: int = 1):
  """`check_divisible` for `mesh` and this job's processes."""
  check_divisible(name, size, shards=num_batch_shards(mesh), processes=jax.process_count(), accum_steps=accum_steps)


def path_str(path) -> str:
  """'/'-joined names of a `jax.tree_util` key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """`spec` for `shape`, replicating every dimension that its mesh axis does not divide."""
  if len(spec) != len(shape):
    return P()
  fitted = []
  for axis, dim in zip(spec, shape):
    fitted.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
  return P(*fitted)


def partition_spec(path: str, shape, mesh: Mesh, rules=PARAM_RULES) -> P:
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if _SCANNED_BLOCK.search(path) and len(shape) == len(spec) + 1:
        spec = P(None, *spec)  # `scan_layers` stacks the blocks' parameters along a leading layer axis
      return _fit(spec, shape, mesh)
  return P()


def tree_shardings(tree, mesh: Mesh, rules=PARAM_RULES):
  """A `NamedSharding` for every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) by the rules."""
  def sharding(path, leaf):
    return NamedSharding(mesh, partition_spec(path_str(path), np.shape(leaf), mesh, rules))
  return jax.tree_util.tree_map_with_path(sharding, tree)
