"""Mesh construction, parameter sharding rules and batch checks (8 emulated CPU devices, see conftest)."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import models, sharding
from vit_jax.errors import UserError


def _mesh(data, fsdp, tensor, devices=None):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)


def test_mesh_minus_one_takes_the_rest():
  assert dict(_mesh(-1, 2, 1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(_mesh(2, 2, -1).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(_mesh(1, 1, 1, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, match", [
    ((3, 1, 1), "multiply to 3 but there are 8 devices"),
    ((-1, -1, 1), "at most one -1"),
    ((-1, 3, 1), "3 does not divide 8"),
    ((0, 1, 1), "positive sizes"),
])
def test_bad_mesh(sizes, match):
  with pytest.raises(UserError, match=match):
    _mesh(*sizes)


def test_rules_on_vit_parameters():
  model = models.get_model("ViT-Ti_16", num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  mesh = _mesh(2, 2, 2)
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(shapes, mesh))
  block = specs["Transformer"]["encoderblock_0"]
  assert block["MultiHeadDotProductAttention_1"]["query"]["kernel"] == P("fsdp", None, None)  # 3 heads: not split
  assert block["MultiHeadDotProductAttention_1"]["out"]["kernel"] == P(None, None, "fsdp")
  assert block["MlpBlock_3"]["Dense_0"]["kernel"] == P("fsdp", "tensor")
  assert block["MlpBlock_3"]["Dense_1"]["kernel"] == P("tensor", "fsdp")
  assert block["LayerNorm_0"]["scale"] == P()
  assert specs["embedding"]["kernel"] == P(None, None, None, "fsdp")
  assert specs["head"]["kernel"] == P("fsdp", None)
  assert specs["cls"] == P()


def test_rules_apply_to_optimizer_state_paths():
  mesh = _mesh(2, 2, 2)
  path = "opt_state/1/0/mu/Transformer/encoderblock_3/MultiHeadDotProductAttention_1/key/kernel"
  assert sharding.partition_spec(path, (64, 4, 16), mesh) == P("fsdp", "tensor", None)
  assert sharding.partition_spec("opt_state/1/0/count", (), mesh) == P()


def test_batch_checks():
  mesh = _mesh(4, 2, 1)
  sharding.check_batch_size("batch", 16, mesh, accum_steps=2)
  with pytest.raises(UserError, match="batch=12 is not divisible by the 8 data-parallel devices"):
    sharding.check_batch_size("batch", 12, mesh)
  with pytest.raises(UserError, match="batch/accum_steps=12 is not divisible.*multiple of 16"):
    sharding.check_batch_size("batch", 24, mesh, accum_steps=2)
  with pytest.raises(UserError, match="not divisible by accum_steps=3"):
    sharding.check_batch_size("batch", 16, mesh, accum_steps=3)


def test_rules_on_scanned_parameters_skip_the_layer_axis():
  model = models.get_model("ViT-Ti_16", num_classes=10, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(shapes, _mesh(2, 2, 2)))
  block = specs["Transformer"]["encoderblock"]
  assert block["MlpBlock_3"]["Dense_0"]["kernel"] == P(None, "fsdp", "tensor")  # (layers, hidden, mlp)
  assert block["MlpBlock_3"]["Dense_1"]["kernel"] == P(None, "tensor", "fsdp")
  assert block["MultiHeadDotProductAttention_1"]["out"]["kernel"] == P(None, None, None, "fsdp")  # 3 heads
