"""Schedules against hand computation, weight-decay masks, the optimizer recipes, and per-parameter
learning-rate factors (layer decay, lr_mults) against hand computation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import models, optim
from vit_jax.errors import UserError
from vit_jax.sharding import path_str


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


def test_step_decay_divides_by_ten_at_each_boundary_as_bit_hyperrule():
  # BiT's schedule for < 20k examples: warmup 100, then 10x down at steps 200, 300 and 400 of 500.
  schedule = optim.make_schedule(base_lr=0.003, total_steps=500, warmup_steps=100, decay_type="steps",
                                 decay_steps=(0.4, 0.6, 0.8))
  expected = {0: 0.003 / 100, 99: 0.003, 199: 0.003, 200: 3e-4, 299: 3e-4, 300: 3e-5, 400: 3e-6, 499: 3e-6}
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, err_msg=f"step {step}")
  with pytest.raises(UserError, match="decay_type=steps needs decay_steps"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=1, decay_type="steps", decay_steps=(1.5,))
  with pytest.raises(UserError, match="applies only to decay_type=steps"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=1, decay_type="cosine", decay_steps=(0.5,))


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


# --- Learning-rate factors: layer decay and lr_mults. ---

NUM_LAYERS = 3


def _vit_shapes(scan_layers):
  """`jax.ShapeDtypeStruct`s of a 3-layer testing ViT's params (unrolled `encoderblock_{i}` or stacked)."""
  model = models.get_model("testing", num_classes=3, transformer={"num_layers": NUM_LAYERS}, scan_layers=scan_layers)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]


def _random_like(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _by_path(tree):
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _hand_layer_factor(path, decay, shape):
  """decay**(L + 1) before the blocks, decay**(L - i) for block i (rows of a stacked leaf), 1 after them."""
  parts = path.split("/")
  if parts[0] in ("head", "pre_logits") or parts[:2] == ["Transformer", "encoder_norm"]:
    return 1.0
  if parts[:2] == ["Transformer", "encoderblock"]:
    rows = np.array([decay ** (NUM_LAYERS - i) for i in range(NUM_LAYERS)])
    return rows.reshape((NUM_LAYERS,) + (1,) * (len(shape) - 1))
  if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
    return decay ** (NUM_LAYERS - int(parts[1][len("encoderblock_"):]))
  return decay ** (NUM_LAYERS + 1)  # embedding, cls, Transformer/posembed_input


def test_layer_decay_factors_unrolled():
  shapes = _by_path(_vit_shapes(scan_layers=False))
  factors = _by_path(optim.learning_rate_factors(_vit_shapes(scan_layers=False), layer_decay=0.75))
  assert factors.keys() == shapes.keys()
  spot_checks = {"embedding/kernel": 0.75 ** 4, "embedding/bias": 0.75 ** 4, "cls": 0.75 ** 4,
                 "Transformer/posembed_input/pos_embedding": 0.75 ** 4,
                 "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": 0.75 ** 3,
                 "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/bias": 0.75 ** 2,
                 "Transformer/encoderblock_2/LayerNorm_0/scale": 0.75,
                 "Transformer/encoder_norm/scale": 1.0, "head/kernel": 1.0, "head/bias": 1.0}
  for path, expected in spot_checks.items():
    assert factors[path] == expected, path
  for path, factor in factors.items():
    assert factor == _hand_layer_factor(path, 0.75, shapes[path].shape), path


def test_layer_decay_factors_scanned():
  shapes = _by_path(_vit_shapes(scan_layers=True))
  factors = _by_path(optim.learning_rate_factors(_vit_shapes(scan_layers=True), layer_decay=0.75))
  stacked = [path for path in shapes if path.startswith("Transformer/encoderblock/")]
  assert stacked
  for path in stacked:
    factor, shape = factors[path], shapes[path].shape
    assert factor.shape == (NUM_LAYERS,) + (1,) * (len(shape) - 1), path
    np.testing.assert_array_equal(factor.ravel(), [0.75 ** 3, 0.75 ** 2, 0.75], err_msg=path)
    assert np.broadcast_shapes(factor.shape, shape) == shape
  for path in set(shapes) - set(stacked):
    assert factors[path] == _hand_layer_factor(path, 0.75, shapes[path].shape), path
  assert factors["cls"] == 0.75 ** 4 and factors["head/kernel"] == 1.0


def test_layer_decay_factors_hybrid_stem_and_pre_logits():
  leaf = np.zeros(2)
  params = {"conv_root": {"kernel": leaf}, "gn_root": {"scale": leaf}, "block1": {"unit1": {"conv1": {"kernel": leaf}}},
            "embedding": {"kernel": leaf}, "cls": leaf,
            "Transformer": {"posembed_input": {"pos_embedding": leaf}, "encoderblock_0": {"kernel": leaf},
                            "encoderblock_1": {"kernel": leaf}, "encoder_norm": {"scale": leaf}},
            "pre_logits": {"kernel": leaf}, "head": {"kernel": leaf}}
  factors = _by_path(optim.learning_rate_factors(params, layer_decay=0.5))  # L = 2
  assert factors == {"conv_root/kernel": 0.125, "gn_root/scale": 0.125, "block1/unit1/conv1/kernel": 0.125,
                     "embedding/kernel": 0.125, "cls": 0.125, "Transformer/posembed_input/pos_embedding": 0.125,
                     "Transformer/encoderblock_0/kernel": 0.25, "Transformer/encoderblock_1/kernel": 0.5,
                     "Transformer/encoder_norm/scale": 1.0, "pre_logits/kernel": 1.0, "head/kernel": 1.0}


def test_lr_mults_first_match_wins_and_multiplies_layer_decay():
  shapes = _vit_shapes(scan_layers=False)
  # A list of lists, as from JSON: the first fullmatching regex wins, unmatched paths get 1.
  lr_mults = [["head/kernel", 3.0], ["head/.*", 2.0], ["Transformer/encoderblock_1/.*", 0.5], ["cls", 0]]
  factors = _by_path(optim.learning_rate_factors(shapes, layer_decay=0.5, lr_mults=lr_mults))
  assert factors["head/kernel"] == 3.0 and factors["head/bias"] == 2.0
  assert factors["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] == 0.5 * 0.5 ** 2
  assert factors["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == 0.5 ** 3
  assert factors["cls"] == 0.0 and factors["embedding/kernel"] == 0.5 ** 4
  # fullmatch, not search: "head" alone matches no path, "Dense_0/kernel" no full path.
  without_decay = _by_path(optim.learning_rate_factors(shapes, lr_mults=((".*Dense_0/kernel", 0.25),)))
  assert without_decay["Transformer/encoderblock_2/MlpBlock_3/Dense_0/kernel"] == 0.25
  assert without_decay["Transformer/encoderblock_2/MlpBlock_3/Dense_0/bias"] == 1.0


_DECAYED = dict(layer_decay=0.5)  # powers of two: the factors are exact in float32


def _lr_mults(scan_layers):
  block = "Transformer/encoderblock/MlpBlock_3/.*" if scan_layers else "Transformer/encoderblock_1/MlpBlock_3/.*"
  return (("head/.*", 2.0), (block, 0.5), ("cls", 0.0))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sgd_step_is_plain_step_times_factors(scan_layers):
  shapes = _vit_shapes(scan_layers)
  params, grads = _random_like(shapes, 0), _random_like(shapes, 1)
  factors = optim.learning_rate_factors(shapes, **_DECAYED, lr_mults=_lr_mults(scan_layers))
  plain = _optimizer(momentum=0.9)
  scaled = _optimizer(momentum=0.9, **_DECAYED, lr_mults=_lr_mults(scan_layers))
  plain_updates, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  updates, _ = jax.jit(scaled.update)(grads, scaled.init(params), params)
  for path, update in _by_path(updates).items():
    factor = _by_path(factors)[path]
    hand = -0.1 * np.asarray(_by_path(grads)[path]) * factor  # first SGD step: -lr * g, times the factor
    np.testing.assert_allclose(update, hand, rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(update, np.asarray(_by_path(plain_updates)[path]) * factor, rtol=1e-6, err_msg=path)
  assert not np.any(_by_path(updates)["cls"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adamw_step_is_plain_step_times_factors(scan_layers):
  shapes = _vit_shapes(scan_layers)
  params, grads = _random_like(shapes, 2), _random_like(shapes, 3)
  factors = _by_path(optim.learning_rate_factors(shapes, **_DECAYED, lr_mults=_lr_mults(scan_layers)))
  overrides = dict(optimizer="adamw", weight_decay=0.3)
  plain = _optimizer(**overrides)
  scaled = _optimizer(**overrides, **_DECAYED, lr_mults=_lr_mults(scan_layers))
  plain_updates = _by_path(jax.jit(plain.update)(grads, plain.init(params), params)[0])
  updates = _by_path(jax.jit(scaled.update)(grads, scaled.init(params), params)[0])
  for path, update in updates.items():
    g, p = np.asarray(_by_path(grads)[path]), np.asarray(_by_path(params)[path])
    decay = 0.3 * p if path.endswith("kernel") else 0.0
    # First AdamW step: bias-corrected m = g, v = g**2, so -lr * (g / (|g| + eps) + wd * p), times the factor.
    hand = -0.1 * (g / (np.abs(g) + 1e-8) + decay) * factors[path]
    np.testing.assert_allclose(update, hand, rtol=1e-5, atol=1e-6, err_msg=path)  # float32 moments
    np.testing.assert_allclose(update, np.asarray(plain_updates[path]) * factors[path], rtol=1e-6, err_msg=path)


def test_frozen_parameters_do_not_move_even_with_weight_decay():
  params = {"body": {"kernel": jnp.ones((3,))}, "head": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
  tx = _optimizer(optimizer="adamw", weight_decay=0.5, grad_norm_clip=1.0, lr_mults=(("head/.*", 1.0), (".*", 0.0)))
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(4)
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    params, state = step(params, state, grads)
  np.testing.assert_array_equal(params["body"]["kernel"], np.ones(3))
  assert np.all(np.asarray(params["head"]["kernel"]) != 1.0)
  # Frozen moments stay zero: the optimizer never saw their gradients.
  adam_state = state[1][0]
  np.testing.assert_array_equal(adam_state.mu["body"]["kernel"], np.zeros(3))
  np.testing.assert_array_equal(adam_state.nu["body"]["kernel"], np.zeros(3))


def test_clipping_ignores_frozen_gradients():
  tx = _optimizer(momentum=0.0, grad_norm_clip=1.0, lr_mults=(("head/.*", 0.5), (".*", 0.0)))
  params = {"body": {"kernel": jnp.zeros(1)}, "head": {"kernel": jnp.zeros(2)}}
  grads = {"body": {"kernel": jnp.array([100.0])}, "head": {"kernel": jnp.array([3.0, 4.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Norm over the trained gradients only: 5, so head's gradient clips to [0.6, 0.8]; then -lr * 0.5 times that.
  np.testing.assert_allclose(updates["head"]["kernel"], [-0.1 * 0.5 * 0.6, -0.1 * 0.5 * 0.8], rtol=1e-6)
  np.testing.assert_array_equal(updates["body"]["kernel"], [0.0])


@pytest.mark.parametrize("optimizer, grad_norm_clip", [("sgd", 0.0), ("sgd", 1.0), ("adamw", 1.0)])
def test_optimizer_state_structure_unchanged(optimizer, grad_norm_clip):
  shapes = _vit_shapes(scan_layers=False)
  plain = _optimizer(optimizer=optimizer, grad_norm_clip=grad_norm_clip)
  scaled = _optimizer(optimizer=optimizer, grad_norm_clip=grad_norm_clip, layer_decay=0.75,
                      lr_mults=(("head/.*", 2.0), ("embedding/.*", 0.0)))
  plain_state, scaled_state = jax.eval_shape(plain.init, shapes), jax.eval_shape(scaled.init, shapes)
  assert jax.tree.structure(plain_state) == jax.tree.structure(scaled_state)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), plain_state) == jax.tree.map(lambda s: (s.shape, s.dtype),
                                                                                 scaled_state)


def test_factors_off_is_the_plain_chain():
  params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}
  grads = {"kernel": jnp.array([0.3, 0.7]), "bias": jnp.array([-1.0])}
  plain = _optimizer(optimizer="adamw", weight_decay=0.1, grad_norm_clip=0.5)
  off = _optimizer(optimizer="adamw", weight_decay=0.1, grad_norm_clip=0.5, layer_decay=1.0, lr_mults=[])
  assert off.update.__qualname__ == plain.update.__qualname__  # optax.chain's own update, no wrapper
  plain_updates, _ = plain.update(grads, plain.init(params), params)
  off_updates, _ = off.update(grads, off.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, off_updates, plain_updates)


@pytest.mark.parametrize("layer_decay", [0.0, -0.5, 1.5, float("nan"), True, "0.75"])
def test_layer_decay_out_of_range(layer_decay):
  with pytest.raises(UserError, match=r"config\.layer_decay"):
    _optimizer(layer_decay=layer_decay)
  with pytest.raises(UserError, match=r"config\.layer_decay"):
    optim.learning_rate_factors({"head": {"kernel": np.zeros(1)}}, layer_decay=layer_decay)


def test_layer_decay_without_transformer_blocks():
  with pytest.raises(UserError, match=r"config\.layer_decay=0\.75 needs transformer blocks"):
    optim.learning_rate_factors({"conv_root": {"kernel": np.zeros(1)}, "head": {"kernel": np.zeros(1)}},
                                layer_decay=0.75)


@pytest.mark.parametrize("lr_mults, message", [
    ((("head/.*",),), r"entry \('head/\.\*',\) is not a \(regex, multiplier\) pair"),
    ((("head/.*", "0.5"),), r"entry \('head/\.\*', '0\.5'\)"),
    (((1, 0.5),), r"entry \(1, 0\.5\)"),
    (("head/.*", 0.0), r"is one pair, not a sequence of pairs"),
    ("head/.*", r"must be a sequence of \(regex, multiplier\) pairs"),
    ((("head/(", 1.0),), r"regex 'head/\(' does not compile"),
    ((("head/.*", -1.0),), r"multiplier -1\.0 of regex 'head/\.\*' must be a finite number >= 0"),
])
def test_malformed_lr_mults(lr_mults, message):
  with pytest.raises(UserError, match=r"config\.lr_mults.*" + message):
    _optimizer(lr_mults=lr_mults)  # caught before any parameter exists
  with pytest.raises(UserError, match=message):
    optim.check_lr_mults(_vit_shapes(scan_layers=False), lr_mults)


def test_lr_mults_regex_without_match_names_it_and_real_paths():
  shapes = _vit_shapes(scan_layers=False)
  with pytest.raises(UserError, match=r"config\.lr_mults regex 'haed/\.\*' matches no parameter") as error:
    optim.check_lr_mults(shapes, (("head/.*", 1.0), ("haed/.*", 0.0)))
  for real in ("'head/bias'", "'embedding/bias'", "'Transformer/encoderblock_0/", "'cls'"):
    assert real in str(error.value)
  assert "encoderblock_1" not in str(error.value)  # block 0 stands for every block
  with pytest.raises(UserError, match="scan_layers=True"):
    optim.check_lr_mults(_vit_shapes(scan_layers=True), (("Transformer/encoderblock_0/.*", 0.0),))
  optim.check_lr_mults(shapes, [["head/.*", 1.0], [".*", 0]])  # every regex matches: no error
  # The optimizer's update raises the same error (at trace time) when it is called without the check.
  tx = _optimizer(lr_mults=(("haed/.*", 0.0),))
  params = _random_like(shapes, 5)
  with pytest.raises(UserError, match="haed"):
    tx.update(params, tx.init(params), params)


def test_config_keys_include_the_factors():
  assert {"layer_decay", "lr_mults"} <= set(optim.CONFIG_KEYS)
