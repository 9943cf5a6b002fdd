"""Models: parameter counts, shapes, zoo paths, and the forward pass against an independent numpy reference."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numpy_vit
from vit_jax import models
from vit_jax.errors import UserError

# The zoo's published parameter counts, 1000 classes at 224 px (from the issue; hybrids cannot be derived simply).
ZOO_PARAMETER_COUNTS = {
    "ViT-Ti_16": 5_717_416, "ViT-S_16": 22_050_664, "ViT-B_16": 86_567_656, "ViT-L_16": 304_326_632,
    "ViT-H_14": 632_045_800, "ViT-B_8": 86_576_872, "ViT-S_32": 22_878_952, "ViT-B_32": 88_224_232,
    "ViT-L_32": 306_535_400, "R+ViT-Ti_16": 6_337_704, "R50+ViT-B_16": 98_659_112, "R26+ViT-B_32": 101_383_976,
    "R26+ViT-S_32": 36_431_912, "R50+ViT-L_32": 328_994_856,
}
# timm's resnetv2_*_bit at 1000 classes (the table).
BIT_PARAMETER_COUNTS = {
    "BiT-R50x1": 25_549_352, "BiT-R50x3": 217_319_080, "BiT-R101x1": 44_541_480, "BiT-R101x3": 387_934_888,
    "BiT-R152x2": 236_335_208, "BiT-R152x4": 936_533_224,
}
# timm's counts of the same architectures at 1000 classes and 224 px (timm 1.0.31, `sum(p.numel())` of
# deit3_{small,base,large}_patch16_224, vit_{base,large}_patch16_siglip_*, vit_so400m_patch14_siglip_224 and
# vit_base_patch16_reg4_gap_256, each created with img_size=224).
TIMM_PARAMETER_COUNTS = {
    "DeiT3-S_16": 22_059_496, "DeiT3-B_16": 86_585_320, "DeiT3-L_16": 304_374_760, "ViT-B_16-SigLIP": 93_653_224,
    "ViT-L_16-SigLIP": 316_919_784, "ViT-So400m_14-SigLIP": 428_833_704, "ViT-B_16-reg4-gap": 86_569_192,
}
# Plain ViTs not in that list: (hidden, mlp, layers, patch, class token) for the count by formula below.
OTHER_VITS = {
    "ViT-S_16-gap-norep": (384, 1536, 12, 16, False), "ViT-B_16-gap-norep": (768, 3072, 12, 16, False),
    "ViT-S_32-gap-norep": (384, 1536, 12, 32, False), "ViT-B_32-gap-norep": (768, 3072, 12, 32, False),
    "testing": (10, 10, 1, 16, True), "ViT-CIFAR_4": (256, 512, 6, 4, True),
}


def count_by_formula(hidden, mlp, layers, patch, class_token, classes=1000, image=224):
  tokens = (image // patch) ** 2 + class_token
  block = 2 * 2 * hidden + 4 * (hidden * hidden + hidden) + 2 * hidden * mlp + mlp + hidden
  return (patch * patch * 3 * hidden + hidden + tokens * hidden + class_token * hidden + layers * block
          + 2 * hidden + hidden * classes + classes)


def param_shapes(model, image_shape=(1, 224, 224, 3)):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape)))
  return {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(variables["params"]).items()}


def count(shapes):
  return sum(int(np.prod(s)) for s in shapes.values())


def course_cnn_count(classes=10, image=32):
  """The course CNN by hand: 3x3 convs with bias, BatchNorm scale and offset, dense layers on the 8x-pooled map."""
  convs = [(3, 32), (32, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
  conv = sum(9 * i * o + o for i, o in convs)
  batchnorm = 2 * (64 + 128 + 256)
  flat = (image // 8) ** 2 * 256
  return conv + batchnorm + flat * 1024 + 1024 + 1024 * 512 + 512 + 512 * classes + classes


# The registry's own resolution for models that are not zoo models at 224 px.
NATIVE_IMAGE_SIZE = {"ViT-CIFAR_4": 32, "CNN-CIFAR": 32}


def expected_count(name, image_size):
  if name in ZOO_PARAMETER_COUNTS:
    return ZOO_PARAMETER_COUNTS[name]
  if name in BIT_PARAMETER_COUNTS:
    return BIT_PARAMETER_COUNTS[name]
  if name in TIMM_PARAMETER_COUNTS:
    return TIMM_PARAMETER_COUNTS[name]
  if name == "CNN-CIFAR":
    return course_cnn_count(classes=1000, image=image_size)
  return count_by_formula(*OTHER_VITS[name], image=image_size)


def feature_width(config):
  """The width of the pre-logit features: the ViT's hidden size, BiT's 2048 x width, the course CNN's 512."""
  kind = models.family(config)
  if kind == "bit":
    return 2048 * config.width_factor
  return 512 if kind == "cnn" else config.hidden_size


def test_course_cnn_has_the_courses_parameter_count():
  """5.9M on 32-px CIFAR-10 (the course's figure), batch statistics not counted."""
  assert course_cnn_count() == 5_852_234
  shapes = param_shapes(models.get_model("CNN-CIFAR", num_classes=10), (1, 32, 32, 3))
  assert count(shapes) == 5_852_234


def _slow_if_large(name):
  # Tracing the deep or hybrid models takes 10-40 s each on 2 cores: `make test` runs them, the fast subset not.
  return pytest.param(name, marks=pytest.mark.slow) if expected_count(name, 224) > 90_000_000 else name


@pytest.mark.parametrize("name", [_slow_if_large(name) for name in models.model_names()])
def test_every_registry_model_builds_inits_and_runs_forward_at_its_native_size(name):
  """timm-style, one uniform interface for every registered name: the parameter count (the zoo's published one, or
  by formula), the position embedding of the native grid, logits and features (shapes traced, nothing computed)."""
  size = NATIVE_IMAGE_SIZE.get(name, 224)
  config = models.get_model_config(name)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  model = models.get_model(name, num_classes=1000)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  params = variables["params"]
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) == expected_count(name, size)
  if models.family(config) == "vit":
    rows, cols = models.geometry.grid_shape(config, size)
    tokens = rows * cols + models.geometry.posemb_prefix_tokens(config)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, tokens, config.hidden_size)
  assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images).shape == (2, 1000)
  features = models.get_model(name, num_classes=0)
  features_shape = jax.eval_shape(lambda v, x: features.apply(v, x), variables, images).shape
  assert features_shape == (2, feature_width(config))


def test_registry_covers_zoo_and_augreg_names():
  assert set(ZOO_PARAMETER_COUNTS) | set(OTHER_VITS) | set(BIT_PARAMETER_COUNTS) | set(TIMM_PARAMETER_COUNTS) | {
      "CNN-CIFAR"} == set(
      models.model_names())
  assert models.canonical_name("B_16") == "ViT-B_16"
  assert models.canonical_name("R_Ti_16") == "R+ViT-Ti_16"
  assert models.canonical_name("R26_S_32") == "R26+ViT-S_32"
  assert models.get_model_config("S_16-gap-norep").classifier == "gap"
  assert "L_32" not in models.AUGREG_ALIASES  # not part of the AugReg release


def test_zoo_parameter_paths_and_shapes():
  shapes = param_shapes(models.get_model("ViT-B_16", num_classes=1000))
  block = "Transformer/encoderblock_0/"
  assert shapes[block + "MultiHeadDotProductAttention_1/query/kernel"] == (768, 12, 64)
  assert shapes[block + "MultiHeadDotProductAttention_1/out/kernel"] == (12, 64, 768)
  assert shapes[block + "LayerNorm_2/scale"] == (768,)
  assert shapes[block + "MlpBlock_3/Dense_0/kernel"] == (768, 3072)
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  assert shapes["cls"] == (1, 1, 768)
  assert shapes["embedding/kernel"] == (16, 16, 3, 768)
  hybrid = param_shapes(models.get_model("R50+ViT-B_16", num_classes=10))
  assert hybrid["conv_root/kernel"] == (7, 7, 3, 64)
  assert hybrid["gn_root/scale"] == (64,)
  assert hybrid["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
  assert hybrid["block3/unit9/gn3/scale"] == (1024,)
  assert hybrid["embedding/kernel"] == (1, 1, 1024, 768)


@pytest.mark.slow
def test_initialisation_follows_the_zoo():
  model = models.get_model("R+ViT-Ti_16", num_classes=5, head_bias_init=-2.0)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert not np.any(params["cls"]) and not np.any(params["head"]["kernel"])
  np.testing.assert_array_equal(params["head"]["bias"], -2.0)
  posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert 0.01 < posemb.std() < 0.03
  tiny_hybrid = models.get_model("R50+ViT-B_16", num_classes=5, hidden_size=32,
                                 transformer=dict(num_layers=1, mlp_dim=32, num_heads=2),
                                 resnet=dict(num_layers=(1,), width_factor=0.5))
  params = tiny_hybrid.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert not np.any(params["block1"]["unit1"]["gn3"]["scale"])


def tiny(name="testing", **overrides):
  base = dict(hidden_size=32, transformer=dict(num_layers=2, mlp_dim=48, num_heads=4, dropout_rate=0.0))
  return models.get_model(name, num_classes=7, **{**base, **overrides})


@pytest.mark.parametrize("classifier,shape", [
    ("token", (2, 7)), ("gap", (2, 7)), ("unpooled", (2, 6, 7)), ("token_unpooled", (2, 7, 7))])
def test_output_shape_for_every_classifier(classifier, shape):
  model = tiny(classifier=classifier, patches=dict(size=(8, 8)))
  images = jnp.zeros((2, 16, 24, 3))  # non-square: a 2x3 grid
  variables = model.init(jax.random.PRNGKey(0), images)
  assert model.apply(variables, images, train=False).shape == shape


def test_feature_extractor_and_representation_layer():
  images = jnp.zeros((3, 32, 32, 3))
  for num_classes in (0, None):
    model = models.get_model("testing", num_classes=num_classes)
    assert model.apply(model.init(jax.random.PRNGKey(0), images), images).shape == (3, 10)
  model = models.get_model("testing", num_classes=4, representation_size=6)
  variables = model.init(jax.random.PRNGKey(0), images)
  assert variables["params"]["pre_logits"]["kernel"].shape == (10, 6)
  assert model.apply(variables, images).shape == (3, 4)


@pytest.mark.slow
def test_hybrid_forward_at_224_and_384():
  # The real R50 stem (3, 4, 9) at half width, under a small transformer: /16 like R50+ViT-B_16.
  model = models.get_model("R50+ViT-B_16", num_classes=3, hidden_size=32,
                           transformer=dict(num_layers=1, mlp_dim=32, num_heads=2),
                           resnet=dict(num_layers=(3, 4, 9), width_factor=0.5))
  for size, tokens in ((224, 197), (384, 577)):
    images = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), images)["params"]
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, tokens, 32)
    assert models.num_tokens(models.get_model_config("R50+ViT-B_16"), size) == tokens
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  logits = model.apply(variables, jnp.ones((1, 224, 224, 3)))
  assert logits.shape == (1, 3) and np.all(np.isfinite(logits))


def randomized(params, seed=0):
  """Every parameter replaced by noise: zero-initialised heads, class tokens and scales would hide bugs."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(params)
  return {"/".join(k): (rng.normal(size=v.shape) * (0.3 if v.ndim > 1 else 1.0)).astype(np.float32)
          for k, v in flat.items()}


def unflatten(flat):
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


@pytest.mark.parametrize("classifier", ["token", "gap", "token_unpooled"])
def test_vit_forward_matches_numpy_reference(classifier):
  model = tiny(classifier=classifier, patches=dict(size=(4, 4)), representation_size=16)
  images = np.random.default_rng(1).uniform(-1, 1, size=(2, 12, 16, 3)).astype(np.float32)
  flat = randomized(model.init(jax.random.PRNGKey(0), images)["params"])
  ours = np.asarray(model.apply({"params": unflatten(flat)}, images))
  reference = numpy_vit.forward(flat, images, num_heads=4, classifier=classifier)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.slow
def test_hybrid_forward_matches_numpy_reference():
  model = models.get_model("R50+ViT-B_16", num_classes=5, hidden_size=32, patches=dict(size=(2, 2)),
                           transformer=dict(num_layers=1, mlp_dim=32, num_heads=2, dropout_rate=0.0),
                           resnet=dict(num_layers=(2, 1), width_factor=0.5))
  images = np.random.default_rng(2).uniform(-1, 1, size=(2, 48, 32, 3)).astype(np.float32)
  flat = randomized(model.init(jax.random.PRNGKey(0), images)["params"])
  ours = np.asarray(model.apply({"params": unflatten(flat)}, images))
  reference = numpy_vit.forward(flat, images, num_heads=2, resnet_layers=(2, 1))
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32():
  model = tiny(patches=dict(size=(4, 4)))
  images = np.random.default_rng(3).uniform(-1, 1, size=(4, 16, 16, 3)).astype(np.float32)
  params = unflatten(randomized(model.init(jax.random.PRNGKey(0), images)["params"]))
  f32 = np.asarray(model.apply({"params": params}, images))
  bf16_model = tiny(patches=dict(size=(4, 4)), dtype=jnp.bfloat16)
  bf16 = bf16_model.apply({"params": params}, images)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), f32, rtol=0.05, atol=0.05 * np.abs(f32).max())


@pytest.mark.slow
def test_fused_attention_and_remat_keep_numerics_and_parameter_paths():
  images = np.random.default_rng(4).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  labels = jax.nn.one_hot(np.array([1, 5]), 7)
  reference = tiny(patches=dict(size=(4, 4)))
  params = unflatten(randomized(reference.init(jax.random.PRNGKey(0), images)["params"]))

  def loss_and_grads(model):
    loss = lambda p: -jnp.sum(labels * jax.nn.log_softmax(model.apply({"params": p}, images, train=True)))
    return jax.value_and_grad(loss)(params)

  want_loss, want_grads = loss_and_grads(reference)
  # Some gradients are zero up to rounding (a key bias cannot change a softmax): compare on the global scale. The
  # fused attention sums in another order: on an AMX host one gradient entry that cancels down to 2e-4 of the
  # scale differed by 1.25e-6 of it (float32 rounding), so the bound is 4e-6 of the scale.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for overrides in (dict(fused_attention=True), dict(remat="full"), dict(remat="save_dots"),
                    dict(fused_attention=True, remat="full")):
    model = tiny(patches=dict(size=(4, 4)), **overrides)
    assert param_shapes(model, images.shape) == param_shapes(reference, images.shape)
    loss, grads = loss_and_grads(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=4e-6 * scale)
  with pytest.raises(UserError, match="unknown remat policy 'some'"):
    tiny(remat="some").init(jax.random.PRNGKey(0), images)


@pytest.mark.slow
def test_dropout_is_active_only_in_training():
  model = tiny(patches=dict(size=(4, 4)), transformer=dict(num_layers=1, mlp_dim=8, num_heads=2,
                                                           dropout_rate=0.5))
  images = jnp.ones((2, 8, 8, 3))
  params = unflatten(randomized(model.init(jax.random.PRNGKey(0), images)["params"]))
  eval_a = model.apply({"params": params}, images)
  eval_b = model.apply({"params": params}, images, train=False)
  train = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train, eval_a)


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (False, "full"), (True, "none"), (True, "full")])
def test_stochastic_depth_drops_whole_branches_per_example_with_the_linear_rule(scan_layers, remat):
  # Two layers: the linear rule gives block 0 rate 0 and block 1 the full rate. In training each example's output
  # must equal the numpy reference with block 1's attention and MLP branches each dropped (x0) or kept
  # (x 1 / (1 - rate)); the four combinations each appear about a quarter of the time at rate 0.5.
  rate, batch = 0.5, 64
  images = np.random.default_rng(5).uniform(-1, 1, size=(batch, 8, 8, 3)).astype(np.float32)
  plain = tiny(patches=dict(size=(4, 4)))
  flat = randomized(plain.init(jax.random.PRNGKey(0), images[:1])["params"])
  model = tiny(patches=dict(size=(4, 4)), stochastic_depth=rate, scan_layers=scan_layers,
               remat=remat)
  params = models.stack_layers(unflatten(flat)) if scan_layers else unflatten(flat)
  train = np.asarray(model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)}))
  kept = 1 / (1 - rate)
  combos = [(a, m) for a in (0.0, kept) for m in (0.0, kept)]
  references = [numpy_vit.forward(flat, images, num_heads=4, branch_scales={1: combo}) for combo in combos]
  chosen = []
  for i in range(batch):
    matches = [c for c, ref in enumerate(references) if np.allclose(train[i], ref[i], rtol=1e-4, atol=1e-4)]
    assert len(matches) == 1, (i, matches)
    chosen.append(matches[0])
  counts = np.bincount(chosen, minlength=4)
  assert all(6 <= n <= 26 for n in counts), counts  # binomial(64, 1/4): mean 16, sd 3.5
  # Evaluation never drops: the zoo's function.
  np.testing.assert_allclose(model.apply({"params": params}, images), numpy_vit.forward(flat, images, num_heads=4),
                             rtol=1e-4, atol=1e-4)


def test_stochastic_depth_out_of_range_names_the_key():
  for bad in (-0.1, 1.0):
    with pytest.raises(UserError, match=rf"stochastic_depth={bad} must be in \[0, 1\)"):
      tiny(stochastic_depth=bad)


def test_unknown_model_name_suggests_close_names():
  with pytest.raises(ValueError, match=r"unknown model name 'ViT-B16'; did you mean .*ViT-B_16"):
    models.get_model_config("ViT-B16")
  with pytest.raises(UserError, match="unknown model field 'hiden_size'"):
    models.get_model("testing", num_classes=2, hiden_size=3)


def test_image_size_not_divisible_by_patch():
  model = models.get_model("ViT-B_16", num_classes=10)
  with pytest.raises(ValueError, match=r"image size 225x224 is not divisible by the patch size 16x16 of ViT-B_16"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 225, 224, 3))))
  hybrid = models.get_model("R50+ViT-B_16", num_classes=10)
  with pytest.raises(ValueError, match="patch size 16x16 of R50"):
    jax.eval_shape(lambda: hybrid.init(jax.random.PRNGKey(0), jnp.zeros((1, 200, 200, 3))))
