"""What the tools share on the command line: each shared flag defined once with one help text, the `--output`
writer, and `run`, the entry of every tool's `__main__`.

The convention, for every tool:

  def define_flags():                                   # the tool's flags, defined only when it runs
    cli.define_flags("checkpoint", "model_name", "batch_size", batch_size=32)   # shared ones (default overridable)
    flags.DEFINE_integer("top_k", 5, "...")                                     # its own ones

  if __name__ == "__main__":
    define_flags()
    cli.run(main)                                       # main() takes no argument; cli.run(main, arguments=True)
                                                        # passes the positional arguments to main(args)

Flags are defined when the tool runs, not when it is imported: tools import one another (`visualize` uses
`trained_model`, the train CLI uses `visualize`) and absl refuses a flag defined twice.
"""
import dataclasses
import json
import math
import numbers
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence, Union

from absl import app, flags
import jax
from ml_collections.config_flags import config_flags

from vit_jax import models, optim
from vit_jax.errors import UserError, run_cli
from vit_jax.models import precision
from vit_jax.sharding import MESH_AXES

FLAGS = flags.FLAGS
# Flags that `define_flags` defines belong to the tool that calls it: its `--help` lists them.
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class _Flag:
  kind: str  # string | integer | bool | enum | mesh
  default: Any
  help: str
  choices: Optional[Sequence[str]] = None


# Every flag more than one tool takes. A tool may change a default (`define_flags(..., name=default)`), never a
# meaning: the help text is the same everywhere.
SHARED_FLAGS = {
    # A trained model and what it is evaluated on.
    "checkpoint": _Flag("string", None, "Training workdir (config.json + model.npz), or a checkpoint of any layout: "
                                        "zoo or big_vision .npz, timm .safetensors, transformers or timm directory, "
                                        "hf://ORG/REPO."),
    "model_name": _Flag("string", None, "Registry model name, e.g. ViT-B_16 (for a .npz: the architecture it is "
                                        "checked against; without it the architecture is read off the shapes)."),
    "image_size": _Flag("integer", None, "Image height and width in pixels; a checkpoint's default is the "
                                         "resolution it was trained at (other sizes resample position embeddings)."),
    "labels": _Flag("string", None, "Text file with one class name per line, in class-index order."),
    "dataset": _Flag("string", None, "digits, a TFDS name or an image folder; tools given a training workdir "
                                     "default to its dataset."),
    "split": _Flag("string", None, "Split in TFDS syntax (test, train[:10%]); default: the run's test split, else "
                                   "test."),
    "tfds_data_dir": _Flag("string", None, "Where prepared TFDS datasets live; default: the run's, else TFDS's."),
    "batch_size": _Flag("integer", 256, "Images per forward pass, global (rounded up to a multiple of the device "
                                        "count)."),
    "strict": _Flag("bool", False, "Fail on the first unreadable image instead of skipping and counting it."),
    "output": _Flag("string", None, "File to write the result to (the tool's docstring says what and its "
                                    "default)."),
    "cpu_devices": _Flag("integer", 0, "CPU hosts only: JAX devices the cores are split into (0: auto, as "
                                       "vit_jax.main does; 1: off)."),
    # A train step of a registry model (benchmark, memory).
    "batch": _Flag("integer", None, "Global batch size of the train step (benchmark: 0 = the largest that fits in "
                                    "device memory)."),
    "num_classes": _Flag("integer", 1000, "Classes of the model's head."),
    "optimizer": _Flag("enum", "sgd", "Optimizer of the train step (vit_jax.optim).", optim.OPTIMIZERS),
    "remat": _Flag("enum", "none", "Rematerialisation policy per encoder block.", tuple(models.REMAT_POLICIES)),
    "dtype": _Flag("enum", precision.AUTO, "Compute dtype (parameters stay float32); auto: bfloat16 on GPU/TPU and "
                                           "CPUs with bf16 units, else float32.", precision.DTYPE_CHOICES),
    "mesh": _Flag("mesh", {"data": -1, "fsdp": 1, "tensor": 1}, "Mesh size of the {axis} axis (-1: the devices the "
                                                                "other axes leave)."),
}


def define_flags(*names: str, **defaults):
  """Defines the shared flags `names` (keys of SHARED_FLAGS); `defaults` changes a flag's default for this tool
  (`mesh` takes a dict of axis sizes and defines `--mesh.data`, `--mesh.fsdp`, `--mesh.tensor`)."""
  unknown = sorted((set(names) | set(defaults)) - set(SHARED_FLAGS))
  if unknown or set(defaults) - set(names):
    raise ValueError(f"no shared flag {unknown or sorted(set(defaults) - set(names))}: define it in the tool, or "
                     "add it to SHARED_FLAGS")
  for name in names:
    spec = SHARED_FLAGS[name]
    default = defaults.get(name, spec.default)
    if spec.kind == "mesh":
      for axis in MESH_AXES:
        flags.DEFINE_integer(f"mesh.{axis}", {**spec.default, **default}[axis], spec.help.format(axis=axis))
    elif spec.kind == "enum":
      flags.DEFINE_enum(name, default, list(spec.choices), spec.help)
    else:
      getattr(flags, f"DEFINE_{spec.kind}")(name, default, spec.help)


def mesh_config() -> dict:
  """{'data', 'fsdp', 'tensor'} sizes of the `mesh` flags."""
  return {axis: FLAGS[f"mesh.{axis}"].value for axis in MESH_AXES}


def device_batch(batch_size: int, num_devices: Optional[int] = None) -> int:
  """`--batch_size` rounded up to a multiple of the device count, so that every device gets an equal share."""
  if batch_size < 1:
    raise UserError(f"--batch_size={batch_size} must be at least 1")
  num_devices = num_devices or jax.device_count()
  return math.ceil(batch_size / num_devices) * num_devices


def write_output(path: str, content: Union[str, Callable[[str], Any]]):
  """Writes a tool's output file, creating its folder: `content` is text, or a function that writes the file at the
  path it is given (a figure, a checkpoint). A path that cannot be written is a UserError naming it."""
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if callable(content):
      content(path)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(content)
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or e}; pass an --output path you can write to") from None


def _non_finite_fields(value, prefix=""):
  """'name=value' of each NaN or infinite float in a JSON-like result (dotted names)."""
  if isinstance(value, dict):
    return [field for key, item in value.items() for field in _non_finite_fields(item, f"{prefix}{key}.")]
  if isinstance(value, (list, tuple)):
    return [field for i, item in enumerate(value) for field in _non_finite_fields(item, f"{prefix}{i}.")]
  return [f"{prefix.rstrip('.')}={value}"] if isinstance(value, numbers.Real) and not math.isfinite(value) else []


def print_json(result, output=None):
  """Prints a tool's result as indented JSON, and writes the same text to `output` when given. A NaN or infinity
  is a UserError naming the field: JSON has no such numbers, and such a result is no result."""
  bad = _non_finite_fields(result)
  if bad:
    source = f" {result['checkpoint']}" if isinstance(result, dict) and result.get("checkpoint") else ""
    raise UserError(f"the result has non-finite values ({', '.join(bad)}): the model computes NaN or infinity; "
                    f"check the checkpoint{source} (python -m vit_jax.tools.inspect shows non-finite parameters)")
  text = json.dumps(result, indent=2, allow_nan=False)
  print(text)
  if output:
    write_output(output, text + "\n")


class _ConfigFileError(Exception):
  """A config file (`DEFINE_config_file` flag) that fails to load; not a ValueError, which absl would rewrap."""


def _config_file_failure(name, argument, e):
  """One-line description of why `--name=argument` did not load: the syntax error's line, or where it raised."""
  path = os.path.abspath(argument.split(":", 1)[0])
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
    return (f"cannot load --{name}={argument}: {type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno}); "
            "fix the file")
  while e.__context__ is not None and "Error whilst parsing config file" in str(e):
    e = e.__context__  # ml_collections re-raises get_config's TypeError and ValueError with its traceback as text
  frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
  where = f" at {frames[-1].filename} line {frames[-1].lineno}" if frames else ""
  what = f"{type(e).__name__}: {' '.join(str(e).split())}" if str(e) else type(e).__name__
  fix = "fix the file"
  if isinstance(e, TypeError) and "get_config()" in str(e) and not frames:  # called with the wrong arguments
    fix = f"pass get_config's argument as --{name}=FILE:ARG, or fix the file" if ":" not in argument else fix
  return f"cannot load --{name}={argument}: {what}{where}; {fix}"


def _report_config_file_errors():
  """Makes every config-file flag raise `_ConfigFileError` when its file fails to load (a syntax error, a
  missing file, `get_config` raising), rather than whatever the file raised."""
  for name in list(FLAGS):
    parser = FLAGS[name].parser
    if not isinstance(parser, config_flags.ConfigFileFlagParser) or getattr(parser, "vit_jax_checked", False):
      continue
    load = parser.parse

    def checked_load(argument, name=name, load=load):
      if not os.path.isfile(argument.split(":", 1)[0]):
        raise _ConfigFileError(f"cannot load --{name}={argument}: no such file; pass a config file, e.g. "
                               f"--{name}=configs/quickstart.py")
      try:
        return load(argument)
      except Exception as e:  # pylint: disable=broad-except  # anything the user's file raises is the file's fault
        raise _ConfigFileError(_config_file_failure(name, argument, e)) from None

    parser.parse = checked_load
    parser.vit_jax_checked = True


def parse_flags(argv, hint="--help lists the flags"):
  """absl's parsing, with a bad flag (unknown name, wrong type, value not among the choices, a misspelt
  `--config.key` of a locked config) or a config file that fails to load as one error line and exit status 2."""
  _report_config_file_errors()
  try:
    return FLAGS(argv)
  except _ConfigFileError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    detail = str(e.args[0] if e.args else e)
    detail = " ".join(detail.replace("\\n", " ").replace("\\", "").replace("'", "").split())
    print(f"error: bad command-line flag ({detail}); {hint}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(main: Callable, *, arguments: bool = False):
  """Runs a tool: absl parses the flags, `main()` runs (with `arguments`, `main(args)` gets the positional
  arguments), and a UserError ends the program with one `error:` line and exit status 2 (`errors.run_cli`).
  A tool without positional arguments rejects any it is given."""
  def body(argv):
    args = list(argv[1:])
    if arguments:
      return main(args)
    if args:
      raise UserError(f"unexpected arguments {' '.join(args)}; pass options as --flag=value (--help lists them)")
    return main()
  app.run(lambda argv: run_cli(body, argv), flags_parser=parse_flags)
