"""Schedules against hand computation, weight-decay masks and the optimizer recipes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import optim
from vit_jax.errors import UserError


@pytest.mark.parametrize("decay_type, expected", [
    # base 1.0, warmup 4 (steps 0..3 -> 1/4..4/4), then decay over steps 4..12 (8 steps).
    ("cosine", {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.5 * (1 + math.cos(math.pi * 4 / 8)), 12: 0.0, 20: 0.0}),
    ("linear", {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.75, 10: 0.25, 12: 0.0}),
    ("constant", {0: 0.25, 3: 1.0, 11: 1.0}),
])
def test_schedule_values(decay_type, expected):
  schedule = optim.make_schedule(base_lr=1.0, total_steps=12, warmup_steps=4, decay_type=decay_type)
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, atol=1e-6, err_msg=f"step {step}")


def test_first_step_learning_rate_is_not_zero():
  schedule = optim.make_schedule(base_lr=0.03, total_steps=10_000, warmup_steps=500, decay_type="cosine")
  np.testing.assert_allclose(float(schedule(0)), 0.03 / 500, rtol=1e-6)
  no_warmup = optim.make_schedule(base_lr=0.03, total_steps=100, warmup_steps=0, decay_type="linear")
  np.testing.assert_allclose(float(no_warmup(0)), 0.03, rtol=1e-6)


def test_unknown_decay_type():
  with pytest.raises(UserError, match="decay_type 'cosin'"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=1, decay_type="cosin")


def test_kernel_mask_only_kernels():
  params = {"Transformer": {"encoderblock_0": {"MlpBlock_3": {"Dense_0": {"kernel": 1, "bias": 2}}},
                            "posembed_input": {"pos_embedding": 3}}, "cls": 4, "head": {"kernel": 5, "bias": 6}}
  mask = optim.kernel_mask(params)
  assert mask["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"] == {"kernel": True, "bias": False}
  assert not mask["Transformer"]["posembed_input"]["pos_embedding"] and not mask["cls"]
  assert mask["head"] == {"kernel": True, "bias": False}


def _optimizer(**overrides):
  args = dict(optimizer="sgd", momentum=0.9, beta2=0.999, momentum_dtype="float32", weight_decay=0.0, base_lr=0.1,
              total_steps=10, warmup_steps=0, decay_type="constant", grad_norm_clip=0.0)
  args.update(overrides)
  tx, _ = optim.make_optimizer(**args)
  return tx


def test_sgd_momentum_matches_hand_computation():
  tx = _optimizer()
  params = {"w": jnp.array([1.0])}
  state = tx.init(params)
  grads = {"w": jnp.array([2.0])}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [-0.2])  # -lr * g
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [-0.1 * (2.0 + 0.9 * 2.0)], rtol=1e-6)  # -lr * (g + 0.9 * m)


def test_bfloat16_momentum():
  tx = _optimizer(momentum_dtype="bfloat16")
  state = tx.init({"w": jnp.ones((3,))})
  floats = [leaf for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert floats and all(leaf.dtype == jnp.bfloat16 for leaf in floats)


def test_adamw_decays_kernels_only():
  tx = _optimizer(optimizer="adamw", weight_decay=0.5)
  params = {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}
  zeros = {"kernel": jnp.zeros(1), "bias": jnp.zeros(1)}
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], [-0.1 * 0.5 * 2.0], rtol=1e-6)  # decoupled: -lr * wd * w
  np.testing.assert_allclose(updates["bias"], [0.0])


def test_clipping_by_global_norm():
  tx = _optimizer(grad_norm_clip=1.0, momentum=0.0)
  params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  updates, _ = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.1, rtol=1e-5)  # clipped to norm 1, times lr


def test_unknown_optimizer():
  with pytest.raises(UserError, match="optimizer 'adam'"):
    _optimizer(optimizer="adam")
