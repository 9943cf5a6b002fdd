"""Errors every CLI shares (`errors.run_cli`, `tools/cli.py`): JAX unable to start the platform JAX_PLATFORMS names,
a config file that fails to load, a result with NaN: one `error:` line, exit status 2, no traceback."""
import glob
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from tests.test_infer import error_line, make_workdir
from vit_jax import errors
from vit_jax.errors import UserError
from vit_jax.tools import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, **environ):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, **environ}, timeout=300)


def _has_platform(name):
  """Whether this machine might start `name`, in which case it is no example of an unavailable one."""
  if name == "cuda":
    return bool(glob.glob("/dev/nvidia[0-9]*"))
  return importlib.util.find_spec("libtpu") is not None


# The train CLI (errors.run_cli directly) and tools on cli.run that start JAX at once or after loading a checkpoint.
COMMANDS = {
    "main": ("vit_jax.main", "--config=configs/quickstart.py", "--workdir={tmp}/run"),
    "check_distributed": ("vit_jax.tools.check_distributed",),
    "evaluate": ("vit_jax.tools.evaluate", "--checkpoint={tmp}/trained"),
}


@pytest.mark.slow
@pytest.mark.parametrize("platform, command", [("cuda", "main"), ("cuda", "check_distributed"),
                                               ("cuda", "evaluate"), ("tpu", "main")])
def test_unavailable_jax_platform_is_one_error_line(platform, command, tmp_path):
  if _has_platform(platform):
    pytest.skip(f"this machine may have a {platform} device")
  if command == "evaluate":
    make_workdir(tmp_path / "trained")
  module, *args = COMMANDS[command]
  result = run_module(module, *(arg.format(tmp=tmp_path) for arg in args), JAX_PLATFORMS=platform)
  line = error_line(result)
  assert line.startswith(f"error: JAX_PLATFORMS={platform} names a platform this machine cannot use (")
  assert "unset it" in line and "pip install" in line
  assert not (tmp_path / "run").exists()  # the train CLI wrote nothing


def test_run_cli_reraises_errors_that_are_not_jax_starting():
  """JAX starts here (the tests' CPU devices), so a RuntimeError is a bug: it keeps its traceback."""
  assert errors.backend_error() is None
  def fail(error):
    raise error
  with pytest.raises(RuntimeError, match="a bug"):
    errors.run_cli(fail, RuntimeError("a bug"))
  with pytest.raises(SystemExit) as exit_info:
    errors.run_cli(fail, UserError("bad value; fix it"))
  assert exit_info.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("text, expected", [
    ("def get_config(:\n", r"SyntaxError: invalid syntax \(.*bad.py, line 1\); fix the file"),
    ("def get_config():\n  raise KeyError('boom')\n", r"KeyError: 'boom' at .*bad.py line 2; fix the file"),
    ("def get_config():\n  return int('x')\n", r"ValueError: invalid literal .* at .*bad.py line 2; fix the file"),
    ("def get_config(arg):\n  return None\n", r"missing 1 required positional argument.*--config=FILE:ARG"),
    (None, r"no such file; pass a config file"),
])
def test_config_file_that_fails_to_load_is_one_error_line(text, expected, tmp_path):
  config = tmp_path / "bad.py"
  if text is not None:
    config.write_text(text)
  line = error_line(run_module("vit_jax.main", f"--config={config}", f"--workdir={tmp_path}/run"))
  assert line.startswith(f"error: cannot load --config={config}: ")
  assert re.search(expected, line), line
  assert not (tmp_path / "run").exists()


def test_print_json_refuses_non_finite_numbers(capsys, tmp_path):
  with pytest.raises(UserError, match=r"non-finite values \(loss=nan, per_class.1=inf\).*checkpoint runs/x"):
    cli.print_json({"loss": math.nan, "per_class": [1.0, math.inf], "checkpoint": "runs/x"}, tmp_path / "r.json")
  assert capsys.readouterr().out == "" and not (tmp_path / "r.json").exists()  # nothing half-written
  cli.print_json({"loss": 0.5, "count": 3})
  assert '"loss": 0.5' in capsys.readouterr().out
