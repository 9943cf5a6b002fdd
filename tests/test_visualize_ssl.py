"""`visualize reconstruction`: a tiny MAE and masked-patch run restored from its checkpoint (read-only), the pictures'
numbers against the model called here with the same masks, the PNG through `main`, and the errors."""
import dataclasses
import os
import shutil

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.test_train import tiny_config
from vit_jax import checkpoint, models, objectives, train
from vit_jax import workdir as workdir_lib
from vit_jax.errors import UserError
from vit_jax.objectives import masked_patch
from vit_jax.tools import reconstruction, visualize

FLAGS = flags.FLAGS
SMALL_VIT = {"hidden_size": 32, "patches": {"size": (4, 4)},
             "transformer": {"num_layers": 2, "mlp_dim": 64, "num_heads": 4, "dropout_rate": 0.0}}
TINY_DECODER = {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}
P = 4  # patch side; 16 px images: a 4x4 grid of patches


def ssl_run(path, trainer):
  """A two-step run of `trainer` on digits, its one checkpoint at step 2."""
  config = tiny_config(trainer=trainer, label_smoothing=0.0, model=dict(SMALL_VIT), total_steps=2, warmup_steps=1,
                       eval_every=0, checkpoint_every=0, progress_every=1)
  config.ssl.update(TINY_DECODER)
  workdir = str(path)
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
  return ssl_run(tmp_path_factory.mktemp("mae") / "run", "mae")


@pytest.fixture(scope="module")
def masked_patch_workdir(tmp_path_factory):
  return ssl_run(tmp_path_factory.mktemp("masked_patch") / "run", "masked_patch")


def listing(workdir):
  """{relative path: (size, mtime in ns)} of every file and folder under `workdir`."""
  found = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      full = os.path.join(root, name)
      stat = os.stat(full)
      found[os.path.relpath(full, workdir)] = (stat.st_size if name in files else None, stat.st_mtime_ns)
  return found


def patches_of(images):
  """[n, 16, 16, C] -> [n, 16 patches, P, P, C], row by row, cut out by hand."""
  return np.stack([images[:, i:i + P, j:j + P] for i in range(0, 16, P) for j in range(0, 16, P)], axis=1)


def random_images(n, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)


# --- the numbers ------------------------------------------------------------------------------------------------


def test_mae_reconstruction_is_the_visible_input_and_the_denormalised_decoder_output(mae_workdir):
  before = listing(mae_workdir)
  run = reconstruction.load_run(mae_workdir)
  assert run.image_size == 16 and run.config.trainer == "mae"
  # The restored state is the run's last one: its encoder is what model.npz exported.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.variables["params"]["encoder"]),
               checkpoint.load(os.path.join(mae_workdir, "model.npz")))
  images = random_images(3)
  greyed, composite, hidden = reconstruction.mae_reconstruction(run.model, run.variables, run.objective, images,
                                                                jax.random.PRNGKey(7))
  # The same mask and the model called here.
  keep, restore, expected_hidden = run.objective.draw_mask(jax.random.PRNGKey(7), 3, 16)
  np.testing.assert_array_equal(hidden, expected_hidden)
  assert (hidden.sum(axis=1) == 12).all()  # 75% of 16
  out = np.asarray(jax.jit(run.model.apply)(run.variables, jnp.asarray(images), keep=keep, restore=restore))
  true = patches_of(images).reshape(3, 16, -1).astype(np.float64)
  std = np.sqrt(true.var(axis=-1, ddof=1, keepdims=True) + 1e-6)  # norm_pix_loss: MAE's unbiased variance, eps
  expected = np.clip(out * std + true.mean(axis=-1, keepdims=True), -1, 1)
  got = patches_of(composite).reshape(3, 16, -1)
  visible = true[~hidden].astype(np.float32)
  np.testing.assert_array_equal(got[~hidden], visible)
  np.testing.assert_allclose(got[hidden], expected[hidden], atol=1e-5)
  assert np.abs(got[hidden] - true[hidden]).max() > 0.1  # a prediction, not the hidden pixels themselves
  shown = patches_of(greyed).reshape(3, 16, -1)
  np.testing.assert_array_equal(shown[~hidden], visible)
  assert (shown[hidden] == 0.0).all()  # grey
  # Without norm_pix_loss the decoder predicts the pixels themselves: pasted as they are.
  raw = dataclasses.replace(run.objective, norm_pix_loss=False)
  _, composite, _ = reconstruction.mae_reconstruction(run.model, run.variables, raw, images, jax.random.PRNGKey(7))
  np.testing.assert_allclose(patches_of(composite).reshape(3, 16, -1)[hidden], np.clip(out, -1, 1)[hidden], atol=1e-6)
  assert listing(mae_workdir) == before  # nothing written, moved or touched


def level_centre(level):
  return -1 + (level + 0.5) / 4  # the middle of [-1 + k/4, -1 + (k+1)/4)


def test_masked_patch_paints_the_argmax_colour_over_the_corrupted_patches(masked_patch_workdir):
  before = listing(masked_patch_workdir)
  run = reconstruction.load_run(masked_patch_workdir)
  assert run.objective.target == "colour"
  images = random_images(3, seed=2)
  marked, painted, corrupted = reconstruction.masked_patch_prediction(run.model, run.variables, run.objective, images,
                                                                      jax.random.PRNGKey(5))
  expected_corrupted, replace, swap, source = masked_patch.draw_corruption(jax.random.PRNGKey(5), 3, 16, rate=0.5,
                                                                           split=(0.8, 0.1, 0.1))
  np.testing.assert_array_equal(corrupted, expected_corrupted)
  assert (corrupted.sum(axis=1) == 8).all()
  logits = np.asarray(jax.jit(run.model.apply)(run.variables, jnp.asarray(images), corruption=(replace, swap, source)))
  assert logits.shape == (3, 16, 512)
  classes = logits.argmax(axis=-1)
  colours = level_centre(np.stack([classes // 64, classes // 8 % 8, classes % 8], axis=-1))  # r * 64 + g * 8 + b
  got, true = patches_of(painted), patches_of(images)
  for i, k in zip(*np.nonzero(corrupted)):
    np.testing.assert_allclose(got[i, k], np.broadcast_to(colours[i, k], (P, P, 3)), atol=1e-6)
  np.testing.assert_array_equal(got[~corrupted], true[~corrupted])
  assert (patches_of(marked)[corrupted] == 0.0).all()
  np.testing.assert_array_equal(patches_of(marked)[~corrupted], true[~corrupted])
  assert listing(masked_patch_workdir) == before


@pytest.mark.parametrize("target", ["colour_4x4", "pixels"])
def test_masked_patch_targets_paint_sub_patches_or_pixels(target):
  """An untrained model with a random head: each 1x1-pixel sub-patch of a 4x4 patch takes its own argmax colour;
  `pixels` pastes the head's output."""
  objective = objectives.MaskedPatch(target=target)
  one_layer = dict(SMALL_VIT, transformer=dict(SMALL_VIT["transformer"], num_layers=1))
  model = objective.wrap(models.build(models.get_model_config("testing", **one_layer), num_classes=0))
  images = random_images(2, seed=3)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(images))
  kernel = variables["params"]["prediction_head"]["kernel"]
  variables["params"]["prediction_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
  _, painted, corrupted = reconstruction.masked_patch_prediction(model, variables, objective, images,
                                                                 jax.random.PRNGKey(2))
  _, replace, swap, source = masked_patch.draw_corruption(jax.random.PRNGKey(2), 2, 16, rate=0.5,
                                                          split=(0.8, 0.1, 0.1))
  out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images), corruption=(replace, swap, source)))
  got = patches_of(painted)
  if target == "pixels":
    expected = np.clip(out, -1, 1).reshape(2, 16, P, P, 3)  # patchify's order: rows, columns, channels
  else:
    classes = out.reshape(2, 16, 16, 512).argmax(axis=-1)  # 16 sub-patches of 1x1 px, row by row
    expected = level_centre(np.stack([classes // 64, classes // 8 % 8, classes % 8], axis=-1)).reshape(2, 16, P, P, 3)
    assert len(np.unique(classes[corrupted])) > 5
  np.testing.assert_allclose(got[corrupted], expected[corrupted], atol=1e-6)
  np.testing.assert_array_equal(got[~corrupted], patches_of(images)[~corrupted])


# --- the CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture
def run_main():
  """visualize.main with absl's flags parsed from `args` (flags defined once per process, reset afterwards)."""
  if "seed" not in FLAGS:
    visualize.define_flags()

  def run(*args):
    return visualize.main(FLAGS(["visualize", *args])[1:])
  yield run
  FLAGS.unparse_flags()


def assert_picture(path, rows):
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape[0] > 150 * rows and image.shape[1] > 500, image.shape
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a picture, not a blank canvas


def test_main_writes_the_png(run_main, mae_workdir, masked_patch_workdir, tmp_path, capsys):
  before = listing(mae_workdir)
  output = tmp_path / "figures" / "mae.png"
  run_main("reconstruction", f"--checkpoint={mae_workdir}", "--num_images=2", f"--output={output}", "--seed=3")
  assert capsys.readouterr().out.strip() == f"wrote {output}"  # the run's dataset (digits) by default
  assert_picture(output, rows=2)
  assert listing(mae_workdir) == before
  FLAGS.unparse_flags()
  Image.fromarray((random_images(1)[0] * 127.5 + 127.5).astype(np.uint8)).save(tmp_path / "colours.png")
  output = tmp_path / "masked.png"
  run_main("reconstruction", f"--checkpoint={masked_patch_workdir}", f"--output={output}",
           str(tmp_path / "colours.png"))
  assert_picture(output, rows=1)


def test_errors(run_main, mae_workdir, tmp_path):
  for path, what in [(tmp_path / "missing", "does not exist"), (os.path.join(mae_workdir, "model.npz"), "is a file"),
                     (tmp_path, "has no config.json")]:
    with pytest.raises(UserError, match=f"--checkpoint={path} is not a training workdir \\({what}\\)"):
      reconstruction.load_run(str(path))
  supervised = tmp_path / "supervised"
  supervised.mkdir()
  workdir_lib.write_config(tiny_config(), str(supervised))  # the config.json of a tiny supervised run
  with pytest.raises(UserError) as raised:
    run_main("reconstruction", f"--checkpoint={supervised}", "--output=unused.png")
  assert str(raised.value) == ("reconstruction pictures a self-supervised run (trainer mae or masked_patch); "
                               f"{supervised} was trained with trainer=supervised")
  # The export alone: the decoder is gone.
  exported = tmp_path / "exported"
  exported.mkdir()
  for name in ("config.json", "model.npz"):
    shutil.copy(os.path.join(mae_workdir, name), exported / name)
  with pytest.raises(UserError, match="exported has no checkpoint; the decoder is kept only there"):
    reconstruction.load_run(str(exported))
  # A damaged checkpoint is reported and left where it is (training would move it aside).
  damaged = tmp_path / "damaged"
  shutil.copytree(mae_workdir, damaged)
  state_dir = damaged / "checkpoints" / "2" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name != "_METADATA" and not name.startswith("_"):
        os.truncate(os.path.join(root, name), 0)
  before = listing(str(damaged))
  with pytest.raises(UserError, match="can be restored \\(step 2: "):
    reconstruction.load_run(str(damaged))
  assert listing(str(damaged)) == before
  assert not os.path.exists("unused.png")
