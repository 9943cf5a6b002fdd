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

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex over the path, PartitionSpec). The first match wins.
PARAM_RULES = (
    (r".*/(query|key|value)/kernel$", P("fsdp", "tensor", None)),  # (hidden, heads, head_dim)
    (r".*/(query|key|value)/bias$", P("tensor", None)),  # (heads, head_dim)
    (r".*/out/kernel$", P("tensor", None, "fsdp")),  # (heads, head_dim, hidden)
    (r".*/MlpBlock_3/Dense_0/kernel$", P("fsdp", "tensor")),  # (hidden, mlp)
    (r".*/MlpBlock_3/Dense_0/bias$", P("tensor")),
    (r".*/MlpBlock_3/Dense_1/kernel$", P("tensor", "fsdp")),  # (mlp, hidden)
    (r"(.*/)?embedding/kernel$", P(None, None, None, "fsdp")),  # (patch, patch, 3, hidden)
    (r"(.*/)?head/kernel$", P("fsdp", None)),  # (hidden, classes)
)


_SCANNED_BLOCK = re.compile(r"(^|/)encoderblock/")


def make_mesh(mesh_config, devices: Sequence[jax.Device] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the devices the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  described = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f"invalid mesh ({described}); use positive sizes and at most one -1")
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if len(devices) % known:
      raise UserError(f"mesh ({described}) cannot use {len(devices)} devices: {known} does not divide "
                      f"{len(devices)}; choose sizes whose product divides the device count")
    sizes[free[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise UserError(f"mesh sizes ({described}) multiply to {int(np.prod(list(sizes.values())))} but there are "
                    f"{len(devices)} devices; make them multiply to {len(devices)} or set one to -1")
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


def check_batch_size(name: str, size: int, mesh: Mesh, accum_steps: int = 1):
  """UserError unless every device and every process gets an equal share of each (micro)batch."""
  shards, processes = num_batch_shards(mesh), jax.process_count()
  if size % accum_steps:
    raise UserError(f"{name}={size} is not divisible by accum_steps={accum_steps}; use a multiple of {accum_steps}")
  micro = size // accum_steps
  for count, what in ((shards, f"the {shards} data-parallel devices (mesh.data x mesh.fsdp)"),
                      (processes, f"the {processes} processes")):
    if micro % count:
      per = f"{name}/accum_steps={micro}" if accum_steps > 1 else f"{name}={size}"
      raise UserError(f"{per} is not divisible by {what}; use a multiple of {count * accum_steps}")


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
