"""Convert checkpoints between layouts, no torch needed: any layout to the zoo's `.npz`, and a workdir or `.npz` to
timm's `.safetensors`, a transformers ViT directory or a big_vision `.npz`.

  python -m vit_jax.tools.convert --input=runs/quickstart --output=model.safetensors        # workdir or .npz -> timm
  python -m vit_jax.tools.convert --input=model.safetensors --output=model.npz              # timm -> zoo
  python -m vit_jax.tools.convert --input=runs/quickstart --output=hf_vit --to=hf           # -> transformers
  python -m vit_jax.tools.convert --input=hf_vit --output=model.npz                         # transformers -> zoo
  python -m vit_jax.tools.convert --input=runs/quickstart --output=bv.npz --to=big_vision   # -> big_vision
  python -m vit_jax.tools.convert --input=hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --output=b16.npz

Writing `.npz` reads any layout (`vit_jax.models.layouts`: told by content); writing `.safetensors` exports timm's
layout (`vit_jax.models.timm_layout`), whose metadata holds `vit_jax.model_config` (JSON) and `timm_kwargs` (JSON):
the `VisionTransformer(**timm_kwargs)` (or BiT's `ResNetV2`) arguments that rebuild the model in timm, and
`timm_model` where timm registers the model (`timm.create_model(timm_model, num_classes=N)` loads the file strictly).
Going back, the number of heads comes from that metadata, a timm hub architecture name, `--model_name` or
`--num_heads`. Every direction is exact (transposes and reshapes only): npz -> layout -> npz gives back the same
bits. timm has no representation (`pre_logits`) layer and the course CNN no timm model: neither can be exported.
"""
import json

from absl import flags, logging
import numpy as np

from vit_jax import models
from vit_jax.errors import UserError
from vit_jax.models import big_vision_layout, bit, geometry, hf, layouts, timm_layout, zoo
from vit_jax.tools import cli, trained_model

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this tool, defined only when it runs; `--output` is the .safetensors (timm) or .npz (zoo) to write."""
  cli.define_flags("model_name", "output")
  flags.DEFINE_string("input", None, "Workdir, or a checkpoint of any layout: zoo or big_vision .npz, timm "
                      ".safetensors, transformers or timm directory, hf://ORG/REPO.")
  flags.DEFINE_integer("num_heads", None, "Attention heads, for .safetensors without vit_jax metadata.")
  flags.DEFINE_enum("to", None, ["hf", "big_vision"], "hf: write --output as a Hugging Face transformers ViT "
                    "directory; big_vision: as a big_vision .npz.")


def export_timm(input_path, output_path, model_name=None):
  """Writes the timm state dict of a workdir or zoo `.npz` to `output_path` (.safetensors); returns it."""
  trained = trained_model.load(input_path, model_name=model_name, with_class_names=False)
  family = models.family(trained.model_config)
  if family == "cnn":
    raise UserError(f"{input_path} is {trained_model.describe(trained.model_config)}, which has no timm model; "
                    "convert exports Vision Transformers and BiT ResNets (use the .npz itself)")
  if family == "vit" and not trained.model_config.get("transformer"):
    raise UserError(f"{input_path} is a ResNet without a transformer; timm's VisionTransformer cannot hold it")
  flat = {key: np.asarray(value) for key, value in zoo.flatten(trained.params).items()}
  config_json = json.dumps(trained.model_config.to_dict())
  if family == "bit":
    state = timm_layout.bit_to_timm(flat)
    kwargs = {"layers": list(trained.model_config.block_units), "width_factor": trained.model_config.width_factor,
              "num_classes": trained.num_classes, "stem_type": "fixed"}
    metadata = {"format": "pt", timm_layout.CONFIG_METADATA: config_json,
                timm_layout.TIMM_METADATA: json.dumps(kwargs)}
    if timm_name := timm_layout.timm_bit_name(trained.model_config):
      metadata[timm_layout.TIMM_MODEL_METADATA] = timm_name
  else:
    state = timm_layout.zoo_to_timm(flat)
    metadata = {"format": "pt", timm_layout.CONFIG_METADATA: config_json,
                timm_layout.TIMM_METADATA: json.dumps(timm_layout.timm_kwargs(
                    trained.model_config, trained.num_classes, trained.image_size))}
  cli.write_output(output_path,
                   lambda path: timm_layout.safetensors_numpy().save_file(state, path, metadata=metadata))
  logging.info("Wrote %d tensors to %s", len(state), output_path)
  return state


def import_checkpoint(input_path, output_path, model_name=None, num_heads=None):
  """Writes the zoo `.npz` of a checkpoint of any layout (`layouts.read`: timm, transformers, big_vision, an
  `hf://` name) to `output_path`; with `model_name`, every shape is checked against that model first. Returns the
  `layouts.Checkpoint`; the GELU form and LayerNorm eps its logits need are logged (a `.npz` does not record them)."""
  if model_name and num_heads is None:
    num_heads = (models.get_model_config(model_name).get("transformer") or {}).get("num_heads")
  checkpoint = layouts.read(input_path, num_heads=num_heads)
  flat = checkpoint.flat
  params = zoo.unflatten(flat)
  if model_name:  # the family (and a BiT's width), the ViT options, then every shape against the named model
    shapes = trained_model.flat_shapes(params)
    family = zoo.checkpoint_family(shapes)
    config = models.get_model_config(model_name)
    trained_model.check_family(shapes, family, config, f"--model_name={model_name}", input_path, named=True)
    num_classes = trained_model.num_classes_of(shapes, family)
    if family == "bit":
      trained_model.check_params_match(params, models.build(config, num_classes=num_classes), bit.MIN_IMAGE_SIZE,
                                       f"model {model_name}")
    else:
      zoo.check_structure(flat, config, input_path)
      config.representation_size = shapes["pre_logits/kernel"][-1] if "pre_logits/kernel" in shapes else None
      trained_model.check_params_match(params, models.build(config, num_classes=num_classes),
                                       trained_model.posemb_image_size(params, config), f"model {model_name}")
  cli.write_output(output_path, lambda path: zoo.save(params, path))
  logging.info("Wrote %d arrays of a %s checkpoint to %s", len(flat), checkpoint.layout, output_path)
  numerics = {k: v for k, v in checkpoint.fields.items() if k in ("gelu_approximate", "layer_norm_eps")}
  if numerics and numerics != {"gelu_approximate": True, "layer_norm_eps": 1e-6}:
    logging.warning("%s computes with %s; set these model fields (config file: config.model.update(...)) to "
                    "reproduce its logits exactly", input_path, ", ".join(f"{k}={v}" for k, v in numerics.items()))
  return checkpoint


def export_big_vision(input_path, output_path, model_name=None):
  """Writes a workdir's or checkpoint's ViT as a big_vision `.npz` (`params/` prefix, per-layer blocks)."""
  trained = trained_model.load(input_path, model_name=model_name, with_class_names=False)
  if models.family(trained.model_config) != "vit" or trained.model_config.get("resnet") is not None:
    raise UserError(f"{input_path} is {trained_model.describe(trained.model_config)}; big_vision's ViT layout holds "
                    "plain Vision Transformers")
  flat = big_vision_layout.from_zoo(zoo.flatten(trained.params))
  cli.write_output(output_path, lambda path: zoo.save(zoo.unflatten(flat), path))
  return flat


def export_hf(input_path, output_dir, model_name=None):
  """Writes a workdir's or zoo `.npz`'s plain ViT as a transformers `ViTForImageClassification` directory."""
  trained = trained_model.load(input_path, model_name=model_name, with_class_names=True)
  if models.family(trained.model_config) != "vit":
    raise UserError(f"{input_path} is {trained_model.describe(trained.model_config)}; transformers' ViT layout holds "
                    "plain Vision Transformers")
  flat = {key: np.asarray(value) for key, value in zoo.flatten(trained.params).items()}
  image_size = geometry.image_hw(trained.image_size)
  if image_size[0] != image_size[1]:
    raise UserError(f"image size {image_size} is not square, which transformers' ViTConfig cannot express")
  cli.write_output(output_dir, lambda path: hf.write(
      flat, trained.model_config, path, num_labels=trained.num_classes, image_size=image_size[0],
      class_names=trained.class_names))
  return flat


def main():
  source, target = FLAGS.input, FLAGS.output
  if not source or not target:
    raise UserError("--input and --output are required, e.g. --input=model.npz --output=model.safetensors")
  if FLAGS.to == "hf":
    export_hf(source, target, FLAGS.model_name)
  elif FLAGS.to == "big_vision":
    export_big_vision(source, target, FLAGS.model_name)
  elif target.endswith(".safetensors"):
    export_timm(source, target, FLAGS.model_name)
  elif target.endswith(".npz"):
    import_checkpoint(source, target, FLAGS.model_name, FLAGS.num_heads)
  else:
    raise UserError(f"cannot tell the direction from --input={source} --output={target}; write a .safetensors "
                    "(timm), a .npz (the zoo's, from any layout), or pass --to=hf|big_vision")
  print(f"wrote {target}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
