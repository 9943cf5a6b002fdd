"""Every shell command of README.md, docs/*.md and launch/README.md runs as documented (tiny sizes, offline).

`documented_commands()` finds them: every line of a ```sh/bash/console block, the command lines of plain and
indented code blocks, and inline `python ...` / `launch/... ARGS` / `make ...` spans. TABLE maps each one
(normalized: comments dropped, continuation lines joined, spaces collapsed) to how it is checked:

- Run: the documented command with its placeholders expanded (`sub`) and tiny sizes appended (`tiny`), run in a
  scratch directory with `python` replaced by this venv's interpreter; it must exit with `expect` (0) and print
  `output` / write `files`. A `bug` marks a command that is broken today: it fails as an xfail naming the bug,
  and once it runs the test fails, asking to drop the `bug` (the command is fixed).
- Covered: a synopsis, a bare mention of a program, or a near-duplicate (the same flags, or their defaults) of
  other entries, which run its concrete forms.
- Skip: why it does not run here (network, a cluster, the test suite itself, or a cost another test already pays).

A command added to the docs without an entry, or an entry whose command left the docs, fails
`test_every_documented_command_has_an_entry`.

The scratch directory of each command holds what the docs assume: `configs/` (a link to the repository's), the
launchers run from the repository (`launch/...` becomes an absolute path, so they find the repository's .venv),
a tiny quickstart run in `runs/quickstart` (trained once per session by the documented command itself), stand-ins
for zoo files with the documented names (`ViT-B_16.npz` is the registry's one-layer `testing` model at 224 px,
10 classes, so `--model_name=ViT-B_16` becomes `--model_name=testing`; the Ti_16 AugReg file has ViT-Ti/16's real
shapes), and the images, folders and labels file the commands name. TFDS datasets become `digits` (no download).
"""
import dataclasses
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "launch/README.md"]

# --- finding the documented commands ----------------------------------------------------------------------------

SHELL_FENCES = {"sh", "bash", "console", "shell", "shell-session"}
# A command line: optional `$ ` prompt, an optional `(note) `, environment assignments, then a program.
COMMAND = re.compile(r"^(\(.*?\) )?(\w+=\S* )*(python3?|\S*/bin/python|make|bash|sh|sbatch|srun|pip3?|tensorboard|"
                     r"pytest|export|wget|gcloud|kubectl|docker|launch/\S+)( |$)")


def normalize(command: str) -> str:
  """One line, comments dropped, spaces collapsed: the key of TABLE."""
  command = re.sub(r"\s+#\s.*$", "", command.strip())
  return " ".join(command.split())


def _block_commands(lines, every_line):
  """Commands of a code block: every line of a shell block, else the lines that start with a program."""
  found = []
  for line in re.sub(r"\\\n\s*", " ", "\n".join(lines)).split("\n"):
    line = line.strip()
    line = line[2:] if line.startswith("$ ") else line
    if line and not line.startswith("#") and (every_line or COMMAND.match(line) or "python -m vit_jax" in line):
      found.append(normalize(line))
  return found


def commands_in(text: str):
  """The shell commands of one markdown file, in order."""
  found, prose, lines, i = [], [], text.split("\n"), 0
  while i < len(lines):
    fence = re.match(r"^\s*```\s*([\w-]*)\s*$", lines[i])
    if fence:
      end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
      if fence.group(1) in SHELL_FENCES | {""}:
        found += _block_commands(lines[i + 1:end], every_line=bool(fence.group(1)))
      prose.append("")
      i = end + 1
    elif re.match(r"^ {4,}\S", lines[i]) and (not prose or not prose[-1].strip()):  # an indented code block
      end = i
      while end < len(lines) and (re.match(r"^ {4,}\S", lines[end]) or (
          not lines[end].strip() and end + 1 < len(lines) and re.match(r"^ {4,}\S", lines[end + 1]))):
        end += 1
      found += _block_commands(lines[i:end], every_line=False)
      prose.append("")
      i = end
    else:
      prose.append(lines[i])
      i += 1
  # Inline code (a span may wrap onto the next line) naming a program with at least one argument.
  for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", "\n".join(prose)):
    span = normalize(span)
    if len(span.split()) >= 2 and COMMAND.match(span):
      found.append(span)
  return found


def documented_commands():
  """{normalized command: [the docs it appears in]}, in order of first appearance."""
  where = {}
  for doc in DOCS:
    for command in commands_in((ROOT / doc).read_text(encoding="utf-8")):
      where.setdefault(command, [])
      if doc not in where[command]:
        where[command].append(doc)
  return where


# --- the table --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  sub: tuple = ()  # (documented text, what runs instead) pairs: placeholders, zoo names, TFDS names
  tiny: str = ""  # appended flags: tiny model, few steps and images
  expect: int = 0  # exit status
  output: str = ""  # a regex that stdout + stderr must match
  files: tuple = ()  # files the command must write (removed first if the scratch directory has them)
  env: tuple = ()  # (name, value) pairs added to the environment
  in_repo: bool = False  # run in the repository itself (make -n) instead of the scratch directory
  check: Optional[Callable] = None  # check(stdout) -> None, asserting more
  bug: str = ""  # a known bug: xfail while it fails; once it runs, drop this
  timeout: int = 420  # generous: a loaded 2-core host is several times slower


@dataclasses.dataclass(frozen=True)
class Covered:
  by: tuple  # the entries that run its concrete forms
  why: str


@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str


def covered(*by, why):
  return Covered(by, why)


QUICKSTART = "python -m vit_jax.main --config=configs/quickstart.py --workdir=runs/quickstart"
# The quickstart config cut to a one-layer model and two steps (its final eval and export still run).
TRAIN_TINY = ("--config.total_steps=2 --config.warmup_steps=1 --config.model.transformer.num_layers=1 "
              "--config.batch=32 --config.eval_every=0 --config.checkpoint_every=0 --config.peak_flops=1e12")
BIT_INFER_PEER = ("python -m vit_jax.tools.benchmark --model_name=BiT-R50x1 --image_size=224 --batch=16 "
                  "--num_classes=1000 --steps=5 --warmup=2 --mode=infer --peer_python=.peer/bin/python")
CNN_DIGITS = "python -m vit_jax.main --config=configs/cnn_digits.py --workdir=runs/cnn_digits"
# The course CNN on digits for two steps (its final eval and export still run).
CNN_TINY = ("--config.total_steps=2 --config.warmup_steps=1 --config.batch=32 --config.eval_every=0 "
            "--config.checkpoint_every=0 --config.peak_flops=1e12")
FEWSHOT_TINY = "--train_split=train[:100] --test_split=test[:20] --shots=1,5 --seeds=1"
MAE_DIGITS = "python -m vit_jax.main --config=configs/ssl_digits.py:mae --workdir=runs/mae_digits"
# The SSL digits runs: the quickstart's cut plus no few-shot probe (the loop's tests run it).
SSL_TINY = TRAIN_TINY + " --config.fewshot.every=0"
MAE_FINETUNE = ("python -m vit_jax.main --config=configs/digits_10_labels.py --workdir=runs/mae_digits_10_labels "
                "--config.pretrained_path=runs/mae_digits/model.npz")
BENCH_TINY = "--batch=8 --steps=1 --warmup=0"
NETWORK = "downloads (no network here)"
B16_TO_TESTING = ("--model_name=ViT-B_16", "--model_name=testing")
TI_16_FILE = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"
MEMORY_SCALING = ("python -m vit_jax.tools.memory --model_name=ViT-H_14 --batch=4096 --image_size=224 --devices=256 "
                  "--mesh.data=-1 --mesh.fsdp=16 --optimizer=adamw --remat=full --dtype=bfloat16")
BENCH_BATCH_0 = ("python -m vit_jax.tools.benchmark --model_name=ViT-B_16 --batch=0 --memory_limit_gib=4 --remat=full "
                 "--scan_layers --compile_only")
BENCH_TI_TRAIN = ("python -m vit_jax.tools.benchmark --model_name=ViT-Ti_16 --patch=4 --image_size=32 --batch=128 "
                  "--num_classes=10 --steps=8 --mode=train")
BENCH_TI = BENCH_TI_TRAIN.replace("--mode=train", "--mode=train|infer [--dtype=auto|bfloat16|float32] "
                                                  "[--cpu_devices=1]")
BENCH_README = ("python -m vit_jax.tools.benchmark --model_name=ViT-B_16 --batch=256 --mode=train|infer "
                "[--dtype=auto|bfloat16|float32 --remat=full --scan_layers --fused_attention --mesh.fsdp=8]")
INFER = "python -m vit_jax.tools.infer --checkpoint=runs/quickstart image.png folder/ --top_k=3 --output=preds.jsonl"
EVALUATE = "python -m vit_jax.tools.evaluate --checkpoint=runs/quickstart"
EVALUATE_NPZ = ("python -m vit_jax.tools.evaluate --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --dataset=cifar10 "
                "--split=test --image_size=384 --batch_size=256 --output=result.json")
FEWSHOT = "python -m vit_jax.tools.fewshot --checkpoint=runs/quickstart --shots=1,5,10,25 --seeds=3"
FEWSHOT_NPZ = ("python -m vit_jax.tools.fewshot --checkpoint=ViT-B_16.npz --dataset=oxford_iiit_pet "
               "--train_split=train --test_split=test --l2_reg=0.1")
DATA_BENCH_JPEG = ("python -m vit_jax.tools.data_benchmark --make_jpeg_folder=/tmp/jpegs --num_images=400 "
                   "--workers=0,1,2 --seconds=10")
CHECK_DISTRIBUTED = "launch/local.sh 2 --module=vit_jax.tools.check_distributed"
LOCAL_TRAIN = "launch/local.sh 2 --config=configs/quickstart.py --workdir=runs/mp"
TPU_VM = ("launch/tpu_vm.sh --name=vit --zone=us-central2-b --accelerator_type=v4-32 --config=configs/vit_b16.py "
          "--workdir=gs://BUCKET/runs/b16 --delete")
SBATCH = "sbatch --nodes=4 launch/slurm_gpu.sbatch --config=configs/vit_b16.py --workdir=/shared/runs/b16"
SBATCH_PARTITION = SBATCH.replace("--nodes=4", "--nodes=4 --partition=gpu")
VISUALIZE = "python -m vit_jax.tools.visualize"
ATTENTION = f"{VISUALIZE} attention --checkpoint=runs/quickstart --dataset=digits --num_images=6 --output=a.png"
POSEMB = f"{VISUALIZE} posemb --checkpoint=ViT-B_16.npz --output=posemb.png"
FILTERS = f"{VISUALIZE} filters --checkpoint=ViT-B_16.npz --output=filters.png"
DISTANCE = f"{VISUALIZE} distance --checkpoint=runs/quickstart --dataset=digits --num_images=64"
CURVES = f"{VISUALIZE} curves --workdir=runs/quickstart"
RECIPE = ("python -m vit_jax.main --config=configs/quickstart.py --workdir=runs/recipe --config.pp.randaug=2,5 "
          "--config.pp.cutmix=1.0 --config.model.stochastic_depth=0.1 --config.ema_decay=0.99")
B16_LAYER_DECAY = ("python -m vit_jax.main --config=configs/vit_b16.py --workdir=runs/b16_ld "
                   "--config.pretrained_path=ViT-B_16.npz --config.layer_decay=0.75")
B16_HEAD_ONLY = ("python -m vit_jax.main --config=configs/vit_b16.py --workdir=runs/b16_head "
                 "--config.pretrained_path=ViT-B_16.npz --config.lr_mults='((\"head/.*\", 1.0), (\".*\", 0.0))'")
# The zoo fine-tuning config on the scratch image folder, its ViT-B_16.npz stand-in being the one-layer `testing`.
B16_ON_FOLDER = (("configs/vit_b16.py", "configs/vit_b16.py:folder"),)
B16_TINY = ("--config.model_name=testing --config.pp.crop=32 --config.batch=8 --config.batch_eval=8 "
            "--config.total_steps=2 --config.warmup_steps=1 --config.eval_every=0 --config.checkpoint_every=0 "
            "--config.peak_flops=1e12")
# Near-duplicates: a command whose flags another entry runs (or are the defaults there) is covered by it.
SAME_FLAGS = "the same flags, or their defaults, run"
BATCH_0_COST = ("too slow for this file: the --batch=0 search compiles 5-8 scanned, rematerialised train steps (~50 s "
                "of CPU for the one-layer model); tests/test_benchmark.py::test_batch_zero_finds_the_largest_batch_"
                "that_fits runs --batch=0 --memory_limit_gib --compile_only")


def _equal(stdout, expected):
  assert stdout == expected, stdout


def _table_rows_are_documented(stdout):
  rows = [line for line in stdout.splitlines() if line.startswith("| ViT")]
  scaling = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
  assert rows and all(row in scaling for row in rows), [row for row in rows if row not in scaling]


TABLE_ROWS = [
    # README.md
    ("make train", Run(sub=(("make", "make -n"),), in_repo=True,
                       output=re.escape(".venv/bin/python -m vit_jax.main --config=configs/quickstart.py "
                                        "--workdir=runs/quickstart"))),  # the command QUICKSTART runs, tiny
    ("make test", Run(sub=(("make", "make -n"),), in_repo=True, output=r"-m pytest -q -n 2 tests")),
    (f"python -m vit_jax.tools.inspect {TI_16_FILE}", Run(output=r"model: ViT-Ti_16\b")),
    ("python -m vit_jax.tools.inspect --checkpoint=runs/quickstart",
     Run(output=r"run's model: testing with the overrides(.|\n)*classes: 10")),
    ("python -m vit_jax.main --config=configs/FILE.py[:ARG] --workdir=DIR [--config.key=value ...]",
     # The zoo fine-tuning config on an image folder (its ARG), from its default pretrained_path ViT-B_16.npz.
     Run(sub=(("configs/FILE.py[:ARG]", "configs/vit_b16.py:folder"), ("DIR", "runs/b16"),
              ("[--config.key=value ...]", "--config.model_name=testing")),
         tiny="--config.pp.crop=32 --config.batch=8 --config.batch_eval=8 --config.total_steps=2 "
              "--config.warmup_steps=1 --config.eval_every=0 --config.checkpoint_every=0 --config.peak_flops=1e12",
         files=("runs/b16/model.npz",), output=r"Done at step 2")),
    (LOCAL_TRAIN, Run(tiny=TRAIN_TINY, files=("runs/mp/model.npz",), output=r"Done at step 2")),
    (TPU_VM, Run(tiny="--dry-run", output=r"nohup python3 -m vit_jax.main --config=configs/vit_b16.py "
                                  r"--workdir=gs://BUCKET/runs/b16 (.|\n)*tpu-vm delete vit")),
    (SBATCH, Run(sub=(("sbatch --nodes=4 launch/slurm_gpu.sbatch", "bash launch/slurm_gpu.sbatch --dry-run"),),
                 env=(("SLURM_JOB_NUM_NODES", "4"),), output=r"srun --nodes=4 --ntasks-per-node=8 ")),
    ("launch/gke.sh --name=vit --image=IMAGE --accelerator=nvidia-h100-80gb --num_hosts=2 --chips_per_host=8 "
     "--config=configs/vit_b16.py --workdir=gs://BUCKET/runs/b16",
     Run(tiny="--dry-run", output=r"kind: JobSet(.|\n)*nvidia.com/gpu: 8(.|\n)*kubectl apply")),
    (INFER, Run(output=r"image\.png: \d \d\.\d+, \d \d\.\d+, \d \d\.\d+\n", files=("preds.jsonl",))),
    ("python -m vit_jax.tools.evaluate --checkpoint=runs/quickstart --dataset=digits --split=test",
     covered(EVALUATE, EVALUATE_NPZ, why=SAME_FLAGS)),  # digits and test are the run's
    ("python -m vit_jax.tools.fewshot --checkpoint=runs/quickstart --dataset=digits --shots=1,5,10,25",
     covered(FEWSHOT, FEWSHOT_NPZ, why=SAME_FLAGS)),
    (f"{VISUALIZE} attention --checkpoint=runs/quickstart --dataset=digits --output=attention.png",
     covered(ATTENTION, why=SAME_FLAGS)),  # 6 images is the default
    (f"{VISUALIZE} posemb|filters|distance --checkpoint=...", covered(POSEMB, FILTERS, DISTANCE, why="synopsis")),
    (f"{VISUALIZE} curves --workdir=...", covered(CURVES, why="synopsis")),
    ("python -m vit_jax.tools.convert --input=runs/quickstart --output=model.safetensors",
     Run(output=r"wrote model\.safetensors", files=("model.safetensors",))),
    ('.venv/bin/python -m pytest -n 2 -m "not slow" tests', Skip("the test suite itself (make test runs this file)")),
    ("pip install -c constraints.txt -e .", Skip(f"installs into the environment, {NETWORK}")),
    ("tensorboard --logdir DIR", Skip("a server that runs until stopped; tensorboard is in no extra of setup.py")),
    ("python -m vit_jax.tools.prepare_data --dataset=cifar10 [--tfds_data_dir=DIR] [--manual_dir=DIR]",
     Skip(f"{NETWORK}: cifar10")),
    ('pip install "vit_jax[tfds]"', Skip(f"installs into the environment, {NETWORK}")),
    ("python -m vit_jax.tools.data_benchmark --dataset=...",
     Skip("run as --dataset=digits by tests/test_benchmark.py::test_data_benchmark_cli_runs_on_digits")),
    ("python -m vit_jax.main", covered(QUICKSTART, LOCAL_TRAIN, why="the program named in prose")),
    ("python -m vit_jax.tools.memory --model_name=ViT-H_14 --batch=1024 --devices=64 --mesh.fsdp=64 --optimizer=adamw "
     "--remat=full", covered(MEMORY_SCALING, why=f"{SAME_FLAGS} (with other values)")),
    (BENCH_README,  # every option once; benchmarks.md's synopsis below runs --mode=infer
     Run(sub=(("--mode=train|infer", "--mode=train"), ("[--dtype=auto|bfloat16|float32", "--dtype=float32"),
              ("--mesh.fsdp=8]", "--mesh.fsdp=8")),
         tiny=f"--model_name=testing --image_size=32 {BENCH_TINY}", output=r'"img_per_sec": ')),
    ("python -m vit_jax.tools.NAME", Skip("a placeholder for the tools' names; every tool has entries of its own")),
    ("python -m ...", Skip("a placeholder: every command of the README has entries of its own")),
    (".venv/bin/python -m ...", Skip("a placeholder: every command runs with the venv's python here")),
    ("pip install tensorboard", Skip(NETWORK)),
    # docs/architecture.md adds nothing new; docs/benchmarks.md
    ("export VIT_JAX_PEER_DIR=../shared/peer", Skip("sets up the timm peer, which lives outside the repository")),
    (BENCH_TI, Run(sub=(("--mode=train|infer", "--mode=infer"), ("[--dtype=auto|bfloat16|float32]", "--dtype=auto"),
                        ("[--cpu_devices=1]", "--cpu_devices=1")),
                   tiny=f"--model_name=testing {BENCH_TINY}", output=r'"mode": "infer", "dtype": "float32"')),
    ("PYTHONPATH=$VIT_JAX_PEER_DIR/tv_stub .peer/bin/python $VIT_JAX_PEER_DIR/timm_bench.py --batch 128 "
     "--image_size 32 --patch 4 --name vit_tiny_patch16_224 --steps 8 --warmup 2 --mode train|infer --dtype f32|bf16",
     Skip("the timm peer: needs its torch + timm venv (.peer, made by its setup.sh over the network)")),
    (DATA_BENCH_JPEG, Run(sub=(("/tmp/jpegs", "jpegs"),), tiny="--num_images=8 --workers=0 --seconds=0.2 --batch=4 "
                                                              "--crop=16", output=r"workers=0: \d+ img/s")),
    ("(baseline checkout of d7c08d8) python -m vit_jax.benchmark --model_name=ViT-Ti_16 --patch=4 --image_size=32 "
     "--batch=128 --num_classes=10 --steps=8 --mode=train",
     Skip("a log entry's command at an old commit (vit_jax.benchmark is vit_jax.tools.benchmark now)")),
    (BENCH_TI_TRAIN, covered(BENCH_TI, BENCH_README, why=f"the synopsis's --mode=train form; {SAME_FLAGS}")),
    ("python -m vit_jax.tools.benchmark --model_name=ViT-H_14 --batch=8 --dtype=bfloat16 --compile_only "
     "[--scan_layers] [--remat=full]",
     Run(sub=(("[--scan_layers] [--remat=full]", "--scan_layers --remat=full"),), tiny="--model_name=testing",
         output=r'"compile_s": ')),
    (BENCH_BATCH_0, Skip(BATCH_0_COST)),
    ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform "
     "manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl grain==0.2.18 "
     "array_record==0.8.6 clu==0.0.12 ml_collections==1.1.0 portpicker==1.6.0", Skip(NETWORK)),
    ("launch/gpu_benchmarks.sh b16 FILE", Run(sub=(("FILE", "b16.jsonl"),), tiny="--dry-run",
                                              output=r"--model_name=ViT-B_16 --mode=infer --batch=1024")),
    ("launch/gpu_benchmarks.sh large FILE", Run(sub=(("FILE", "large.jsonl"),), tiny="--dry-run",
                                                output=r"--model_name=ViT-H_14 --mode=train --batch=0")),
    ("bash $VIT_JAX_PEER_DIR/setup.sh .peer", Skip(f"creates the timm peer's venv, {NETWORK}")),
    ("python -m vit_jax.tools.data_benchmark", covered(DATA_BENCH_JPEG, why="the program named in prose")),
    ("python -m vit_jax.tools.benchmark", covered(BENCH_TI, BENCH_README, why="the program named in prose")),
    ('pytest -n 2 -m "not slow"', Skip("the test suite itself")),
    ("python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. bash "
     "launch/gpu_benchmarks.sh b16 $OUT/b16.jsonl",
     Skip("a GPU device-machine command, with wheels downloaded first; its suite runs here as "
          "`launch/gpu_benchmarks.sh b16 FILE --dry-run`")),
    (DATA_BENCH_JPEG + " --randaug=2,10", Run(sub=(("/tmp/jpegs", "jpegs"),), tiny="--num_images=8 --workers=0 "
                                             "--seconds=0.2 --batch=4 --crop=16", output=r"randaug=2,10(.|\n)*"
                                                                                        r"workers=0: \d+ img/s")),
    (BIT_INFER_PEER, Skip("its cost is paid by tests/test_benchmark.py::test_convolutional_models_benchmark (BiT-R50x1, "
                          "infer, 32 px) and its peer by test_peer_runs_on_the_same_shape_after_the_benchmark")),
    (BIT_INFER_PEER.replace("--steps=5 --warmup=2 --mode=infer", "--steps=3 --warmup=1 --mode=train"),
     Skip("the --mode=train form of the same tool; tests/test_benchmark.py benchmarks CNN training and BiT "
          "inference")),
    # docs/recipes.md
    (RECIPE, Run(tiny=TRAIN_TINY, files=("runs/recipe/model.npz",), output=r"holds the ema weights")),
    ("python -m vit_jax.main --config=configs/quickstart.py --workdir=runs/digits/randaug-0 --config.seed=0 "
     "--config.ema_decay=0.99 --config.pp.randaug=2,5", covered(RECIPE, why=f"{SAME_FLAGS} (with other values)")),
    (B16_LAYER_DECAY, Run(sub=B16_ON_FOLDER, tiny=B16_TINY, files=("runs/b16_ld/model.npz",),
                          output=r"Done at step 2")),
    (B16_HEAD_ONLY, Run(sub=B16_ON_FOLDER, tiny=B16_TINY, files=("runs/b16_head/model.npz",),
                        output=r"Done at step 2")),
    # docs/scaling.md
    (CHECK_DISTRIBUTED, Run(output=r'"process_count": 2, "local_devices": 4, "global_devices": 8, "psum": 28')),
    (MEMORY_SCALING, Run(output=re.escape("per device of mesh {'data': 16, 'fsdp': 16, 'tensor': 1}, batch 4096 at "
                                          "224 px") + r"(.|\n)*total +1\.995 GiB")),  # the numbers in scaling.md
    ("python -m vit_jax.tools.benchmark --batch=0 ...", Skip(BATCH_0_COST)),
    ("python -m vit_jax.tools.memory", covered(MEMORY_SCALING, why="the program named in prose")),
    ("python -m vit_jax.tools.memory --table", Run(check=_table_rows_are_documented)),  # == the table in scaling.md
    # docs/use.md
    ("python -m vit_jax.tools.infer --checkpoint=runs/quickstart digit.png more_digits/",
     covered(INFER, why=f"a file and a folder; {SAME_FLAGS}")),
    ("python -m vit_jax.tools.infer --checkpoint=ViT-B_16.npz --model_name=ViT-B_16 --labels=imagenet21k.txt "
     "--image_size=384 --top_k=3 --batch_size=32 --output=preds.jsonl photos/",
     Run(sub=(B16_TO_TESTING,), output=r"photos/x\.jpg: class_\d 0\.\d+, class_\d", files=("preds.jsonl",))),
    (EVALUATE, Run(output=r'"num_examples": 360,(.|\n)*"dataset": "digits",\s*"split": "test"')),
    (EVALUATE_NPZ, Run(sub=(B16_TO_TESTING, ("cifar10", "digits")), tiny="--split=test[:16] --batch_size=8",
         output=r'"image_size": 384', files=("result.json",))),
    (FEWSHOT, Run(output=r'"dataset": "digits"(.|\n)*"fewshot_25shot_accuracy_std"')),
    (FEWSHOT_NPZ, Run(sub=(("oxford_iiit_pet", "digits"),), tiny=FEWSHOT_TINY, output=r'"fewshot_5shot_accuracy"')),
    (ATTENTION, Run(tiny="--num_images=2", files=("a.png",))),
    (f"{VISUALIZE} attention --checkpoint=ViT-B_16.npz --image_size=384 cat.jpg dog.jpg",
     Run(files=("attention.png",))),
    (POSEMB, Run(files=("posemb.png",))),
    (FILTERS, Run(files=("filters.png",))),
    (DISTANCE, Run(tiny="--num_images=8", files=("distance.png",))),
    (CURVES, Run(files=("runs/quickstart/curves.png",))),
    (f"{VISUALIZE} compare --workdir=runs/quickstart --workdir=runs/cnn_digits --output=compare.png",
     Run(output=r"wrote compare\.png", files=("compare.png",))),
    ("python -m vit_jax.tools.infer --checkpoint=runs/cnn_digits digit.png more_digits/",
     Run(output=r"digit\.png: \d \d\.\d+")),
    ("python -m vit_jax.tools.evaluate --checkpoint=runs/cnn_digits",
     Run(output=r'"num_examples": 360,(.|\n)*"dataset": "digits"')),
    ("python -m vit_jax.tools.fewshot --checkpoint=runs/cnn_digits --shots=1,5,10,25 --seeds=3",
     Run(tiny=FEWSHOT_TINY, output=r'"fewshot_5shot_accuracy"')),
    ("python -m vit_jax.tools.convert --input=BiT-M-R50x1.npz --output=bit.safetensors",
     Run(output=r"wrote bit\.safetensors", files=("bit.safetensors",))),
    ("python -m vit_jax.tools.inspect BiT-M-R50x1.npz", Run(output=r"BiT-R50x1")),
    ("python -m vit_jax.tools.convert --input=model.safetensors --output=model.npz", Run(files=("model.npz",))),
    ("python -m vit_jax.tools.inspect FILE",
     covered("python -m vit_jax.tools.inspect model.safetensors", "python -m vit_jax.tools.inspect BiT-M-R50x1.npz",
             why="a synopsis")),
    ("python -m vit_jax.tools.inspect model.safetensors",
     Run(output=r"layout: timm\n(.|\n)*computes with: gelu_approximate=True, layer_norm_eps=1e-06")),
    ("python -m vit_jax.tools.convert --input=runs/quickstart --output=hf_vit --to=hf",
     Run(files=("hf_vit/config.json", "hf_vit/model.safetensors"))),
    ("python -m vit_jax.tools.convert --input=hf_vit --output=model.npz",
     Run(output=r"Wrote 24 arrays of a transformers checkpoint", files=("model.npz",))),
    ("python -m vit_jax.tools.convert --input=timm_vit_b16.safetensors --output=vit.npz --model_name=ViT-B_16",
     Run(sub=(B16_TO_TESTING,), files=("vit.npz",))),
    # docs/checkpoints.md
    ("python -m vit_jax.main --config=configs/vit_b16.py:cifar10 --workdir=runs/b16 "
     "--config.pretrained_path=ViT-B_16.npz",
     Run(sub=((":cifar10", ":folder"),), tiny=B16_TINY, files=("runs/b16/model.npz",), output=r"Done at step 2")),
    *[(f"python -m vit_jax.main --config=configs/vit_b16.py:cifar10 --workdir=runs/{workdir} {flags}",
       Skip(f"{NETWORK}: hf:// hub names (tests/test_layouts.py reads hf:// names offline from a hub cache it "
            "builds, and fine-tunes from every layout through load_pretrained)"))
      for workdir, flags in (
          ("siglip", "--config.model_name=ViT-B_16-SigLIP "
                     "--config.pretrained_path=hf://timm/vit_base_patch16_siglip_224.webli"),
          ("deit3", "--config.model_name=DeiT3-B_16 "
                    "--config.pretrained_path=hf://timm/deit3_base_patch16_224.fb_in22k_ft_in1k"),
          ("reg4", "--config.model_name=ViT-B_16-reg4-gap "
                   "--config.pretrained_path=hf://timm/vit_base_patch16_reg4_gap_256.sbb_in12k_ft_in1k"),
          ("augreg2", "--config.pretrained_path=hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k "
                      "--config.model.gelu_approximate=False"),
          ("google", "--config.pretrained_path=hf://google/vit-base-patch16-224 --config.model.gelu_approximate=False "
                     "--config.model.layer_norm_eps=1e-12"))],
    ("python -m vit_jax.tools.convert --input=runs/quickstart --output=bv.npz --to=big_vision",
     Run(output=r"wrote bv\.npz", files=("bv.npz",))),
    ("VIT_JAX_PEER_DIR=../shared/peer .venv/bin/python -m pytest -s tests/test_layouts.py tests/test_hf.py",
     Skip("a test-suite command (both files run in the suite; the timm and transformers checks need the peer venv)")),
    (".venv/bin/python -m pytest -q -s tests/test_convert.py -k timm",
     Skip("a test-suite command (tests/test_convert.py runs in the suite; timm needs the peer's venv)")),
    # launch/README.md
    ("launch/local.sh 2 --dry-run --port=1234 -- --config=configs/quickstart.py --workdir=runs/mp",
     Run(output=r"JAX_COORDINATOR_ADDRESS=127\.0\.0\.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \S*python\S* -m "
                r"vit_jax\.main --config=configs/quickstart\.py --workdir=runs/mp")),
    ("launch/tpu_vm.sh --name=vit-b16 --zone=us-central2-b --accelerator_type=v4-32 --config=configs/vit_b16.py "
     "--workdir=gs://my-bucket/runs/vit_b16 --delete -- --config.batch=4096",
     Run(sub=((" -- ", " --dry-run -- "),), output=r"--workdir=gs://my-bucket/runs/vit_b16 --config\.batch=4096 ")),
    ("launch/tpu_vm.sh --name=pod --zone=us-west4-a --accelerator_type=v5litepod-64 --queued --spot "
     "--config=configs/imagenet_pretrain.py --workdir=gs://my-bucket/runs/pretrain",
     Run(tiny="--dry-run", output=r"queued-resources create pod (.|\n)*--spot")),
    ("launch/tpu_vm.sh --name=vit-b16 --zone=us-central2-b --accelerator_type=v4-32 --steps=delete",
     Run(tiny="--dry-run", check=lambda out: _equal(out, "gcloud compute tpus tpu-vm delete vit-b16 "
                                                          "--zone=us-central2-b --quiet\n"))),
    (SBATCH_PARTITION, Run(sub=(("sbatch --nodes=4 --partition=gpu launch/slurm_gpu.sbatch",
                                 "bash launch/slurm_gpu.sbatch --dry-run"),),
                           env=(("SLURM_JOB_NUM_NODES", "4"),), output=r"srun --nodes=4 ")),
    ("bash launch/slurm_gpu.sbatch --dry-run --config=configs/vit_b16.py --workdir=/shared/runs/b16",
     Run(output=r"srun --nodes=2 --ntasks-per-node=8 (.|\n)*--workdir=/shared/runs/b16")),
    ("launch/gke.sh --name=vit-b16 --image=us-docker.pkg.dev/PROJECT/REPO/vit_jax:latest "
     "--accelerator=tpu-v5-lite-podslice --topology=4x4 --num_hosts=4 --chips_per_host=4 --config=configs/vit_b16.py "
     "--workdir=gs://my-bucket/runs/b16", Run(tiny="--dry-run", output=r"google.com/tpu: 4")),
    ("launch/gke.sh --name=vit-l16 --image=IMAGE --accelerator=nvidia-h100-80gb --num_hosts=2 --chips_per_host=8 "
     "--config=configs/vit_b16.py --workdir=gs://my-bucket/runs/l16 --dry-run -- --config.model_name=ViT-L_16",
     Run(output=r"--config.model_name=ViT-L_16")),
    ("gcloud compute tpus tpu-vm ssh --worker=all", covered(TPU_VM, why="what tpu_vm.sh runs, shown by its --dry-run")),
    ("python -m vit_jax.main --config=... --workdir=...", covered(QUICKSTART, why="synopsis")),
    ("launch/local.sh N", covered(LOCAL_TRAIN, CHECK_DISTRIBUTED, why="synopsis")),
    ("srun --ntasks-per-node=<GPUs>", covered(SBATCH, why="what the sbatch script runs, shown by its --dry-run")),
    # The quickstart, run once by the session fixture; every tool checks the run it leaves.
    (QUICKSTART, Run(tiny=TRAIN_TINY, output=r"Done at step 2",
                     files=("runs/quickstart/model.npz", "runs/quickstart/curves.png"))),
    (CNN_DIGITS, Run(tiny=CNN_TINY, output=r"Done at step 2", files=("runs/cnn_digits/model.npz",))),
    # Self-supervised pretraining (README, docs/self_supervised.md); the MAE run is a session fixture too.
    (MAE_DIGITS, Run(tiny=SSL_TINY, output=r"Done at step 2", files=("runs/mae_digits/model.npz",))),
    (MAE_FINETUNE, Run(tiny=TRAIN_TINY, output=r"load_pretrained: head/kernel \(64, 10\) from the new model",
                       files=("runs/mae_digits_10_labels/model.npz",))),
    ("python -m vit_jax.main --config=configs/ssl_digits.py:masked_patch --workdir=runs/mpp_digits",
     Skip("the :mae form runs; tests/test_ssl.py trains the masked_patch objective through the loop and "
          "tests/test_configs.py checks this config")),
    ("python -m vit_jax.main --config=configs/digits_10_labels.py --workdir=runs/scratch_10_labels "
     "--config.total_steps=1500", covered(MAE_FINETUNE, why=f"the same config from scratch; {SAME_FLAGS}")),
    (f"{VISUALIZE} reconstruction --checkpoint=runs/mae_digits --dataset=digits --num_images=6",
     Run(output=r"wrote reconstruction\.png", files=("reconstruction.png",))),
    ("python -m vit_jax.tools.benchmark --model_name=ViT-B_16 --image_size=224 --batch=64 --trainer=mae "
     "--mask_ratio=0.75", Skip("tests/test_benchmark.py::test_mae_train_step_counts_the_visible_patches_as_xla_does "
                               "runs it on the one-layer model")),
    ("python -m vit_jax.tools.fewshot --checkpoint=RUN",
     covered("python -m vit_jax.tools.fewshot --checkpoint=runs/cnn_digits --shots=1,5,10,25 --seeds=3",
             why="synopsis; any run's workdir")),
]
TABLE = dict(TABLE_ROWS)


def concrete(command: str, entry: Run) -> str:
  """The command line that runs for `command`: placeholders expanded, tiny sizes appended."""
  for old, new in entry.sub:
    assert old in command, f"{command!r}: no {old!r} to substitute"
    command = command.replace(old, new, 1)
  return f"{command} {entry.tiny}".strip()


def argv_of(command_line: str):
  """The words to execute: `python` is this venv's interpreter, launch/ scripts are the repository's."""
  words = shlex.split(command_line)
  if words[0] in ("python", "python3"):
    words[0] = sys.executable
  return [str(ROOT / w) if w.startswith("launch/") else w for w in words]


# --- the scratch directories ------------------------------------------------------------------------------------


def _shared_dir(tmp_path_factory, name, build):
  """A directory built once per session, also across pytest-xdist workers (a file lock; the first one builds)."""
  base = tmp_path_factory.getbasetemp()
  base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = base / name
  with open(f"{root}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / ".done").exists():
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir()
      build(root)
      (root / ".done").write_text("", encoding="utf-8")
  return root


def _standin(model_name, num_classes, path, size=224):
  """A zoo-format file with `model_name`'s parameter shapes (small noise)."""
  import jax  # pylint: disable=g-import-not-at-top  (collecting this file costs no JAX import)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  model = models.get_model(model_name, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
  rng = np.random.default_rng(0)
  checkpoint.save(jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.02).astype(np.float32), shapes), path)


def _build_inputs(root: Path):
  """What the commands name, besides the quickstart run: zoo stand-ins, images, folders, a labels file."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import convert  # pylint: disable=g-import-not-at-top
  _standin("testing", 10, root / "ViT-B_16.npz")
  _standin("BiT-R50x1", 1000, root / "BiT-M-R50x1.npz")
  _standin("ViT-Ti_16", 21843, root / TI_16_FILE)
  # A timm state dict from another tool: no vit_jax metadata.
  state = convert.export_timm(str(root / "ViT-B_16.npz"), str(root / "exported.safetensors"))
  st_numpy.save_file(state, str(root / "timm_vit_b16.safetensors"))
  os.remove(root / "exported.safetensors")
  convert.export_hf(str(root / "ViT-B_16.npz"), str(root / "hf_vit"))  # a transformers ViT directory
  rng = np.random.default_rng(0)
  images = ["image.png", "digit.png", "more_digits/1.png", "photos/x.jpg", "cat.jpg", "dog.jpg"]
  # folder/: images for infer, and an image-folder dataset (ROOT/{split}/{class}/) for configs/vit_b16.py:folder.
  images += [f"folder/{split}/{label}/{i}.png" for split, count in (("train", 8), ("test", 2)) for label in "ab"
             for i in range(count)]
  for name in images:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name)
  (root / "imagenet21k.txt").write_text("".join(f"class_{i}\n" for i in range(10)), encoding="utf-8")


def run_entry(command: str, entry: Run, cwd: Path):
  line = concrete(command, entry)
  for name in entry.files:
    if (cwd / name).exists() or (cwd / name).is_symlink():
      (cwd / name).unlink()
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | dict(entry.env)
  try:
    result = subprocess.run(argv_of(line), cwd=ROOT if entry.in_repo else cwd, env=env, capture_output=True,
                            text=True, timeout=entry.timeout, check=False, stdin=subprocess.DEVNULL)
  except subprocess.TimeoutExpired as e:
    return line, None, f"timed out after {entry.timeout} s; stderr: {(e.stderr or b'')[-2000:]!r}"
  except OSError as e:  # e.g. a script without its executable bit
    return line, None, f"cannot start: {e}"
  return line, result, None


def problems_of(entry: Run, result, cwd: Path):
  """What is wrong with a finished command (empty when nothing)."""
  output = result.stdout + "\n" + result.stderr
  if result.returncode != entry.expect:
    error = [line for line in result.stderr.splitlines() if line.strip()][-3:]
    return [f"exit status {result.returncode} (expected {entry.expect}): " + " | ".join(error)]
  problems = []
  if entry.output and not re.search(entry.output, output):
    problems.append(f"output does not match {entry.output!r}: {output[-1500:]}")
  problems += [f"{name} was not written" for name in entry.files if not (cwd / name).exists()]
  if entry.check and not problems:
    try:
      entry.check(result.stdout)
    except AssertionError as e:
      problems.append(f"check failed: {e}")
  return problems


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
  return _shared_dir(tmp_path_factory, "documented_inputs", _build_inputs)


def _training_run(tmp_path_factory, inputs, command, name, after=None):
  """(directory, command line, problems) of the tiny training run `command`, built once per session; `after(root)`
  adds files made from the run."""

  def build(root):
    _link_inputs(root, inputs, command)
    line, result, error = run_entry(command, TABLE[command], root)
    problems = [error] if error else problems_of(TABLE[command], result, root)
    (root / "problems.txt").write_text(f"{line}\n" + "\n".join(problems), encoding="utf-8")
    if not problems and after is not None:
      after(root)

  root = _shared_dir(tmp_path_factory, name, build)
  line, *problems = (root / "problems.txt").read_text(encoding="utf-8").split("\n")
  return root, line, [p for p in problems if p]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, inputs):
  """The tiny quickstart run (runs/quickstart) as the documented command leaves it, plus its timm export."""
  def export(root):
    from vit_jax.tools import convert  # pylint: disable=g-import-not-at-top
    convert.export_timm(str(root / "runs" / "quickstart"), str(root / "model.safetensors"))
  return _training_run(tmp_path_factory, inputs, QUICKSTART, "documented_quickstart", export)


@pytest.fixture(scope="session")
def cnn_digits(tmp_path_factory, inputs):
  """The tiny course-CNN run (runs/cnn_digits) as its documented command leaves it."""
  return _training_run(tmp_path_factory, inputs, CNN_DIGITS, "documented_cnn_digits")


@pytest.fixture(scope="session")
def mae_digits(tmp_path_factory, inputs):
  """The tiny MAE pretraining run (runs/mae_digits) as its documented command leaves it."""
  return _training_run(tmp_path_factory, inputs, MAE_DIGITS, "documented_mae_digits")


# The documented training runs that session fixtures make once, and the fixture of each.
FIXTURE_RUNS = {QUICKSTART: "quickstart", CNN_DIGITS: "cnn_digits", MAE_DIGITS: "mae_digits"}


def _link_inputs(cwd: Path, source: Path, command: str):
  """Links `source`'s files into `cwd` (copies its run folders, which the tools write into), leaving out the
  files that `command` writes, and links `configs/`."""
  if not (cwd / "configs").exists():
    (cwd / "configs").symlink_to(ROOT / "configs")
  for item in source.iterdir():
    if item.name in (".done", "problems.txt") or f"--output={item.name}" in command:
      continue
    if item.name == "runs":  # merged: a command may need the runs of two fixtures
      shutil.copytree(item, cwd / "runs", dirs_exist_ok=True)
    elif not (cwd / item.name).exists():
      (cwd / item.name).symlink_to(item)


# --- the tests --------------------------------------------------------------------------------------------------


def test_every_documented_command_has_an_entry():
  documented = documented_commands()
  assert len(TABLE) == len(TABLE_ROWS), "TABLE_ROWS has a command twice"
  missing = [f"{c}  (in {', '.join(docs)})" for c, docs in documented.items() if c not in TABLE]
  stale = [c for c in TABLE if c not in documented]
  assert not missing, "documented commands without an entry in TABLE (run, cover or skip them):\n" + "\n".join(missing)
  assert not stale, "TABLE entries no longer in the docs (remove them):\n" + "\n".join(stale)
  for command, entry in TABLE.items():
    if isinstance(entry, Covered):
      assert entry.by and all(isinstance(TABLE.get(by), Run) for by in entry.by), command
    elif isinstance(entry, Run):
      concrete(command, entry)  # every substitution still applies


def test_the_finder_sees_each_kind_of_command():
  text = ("x `make train` and `python -m vit_jax.main\n--config=c.py` or `launch/local.sh`\n\n```sh\nfoo --a \\\n"
          "  --b  # note\n```\n\n    python -m vit_jax.tools.memory --table\n    ViT-H_14: output\n\n```\nA tree\n"
          "$ launch/gke.sh --dry-run\n```\n")
  assert commands_in(text) == ["foo --a --b", "python -m vit_jax.tools.memory --table", "launch/gke.sh --dry-run",
                               "make train", "python -m vit_jax.main --config=c.py"]


@pytest.mark.slow  # every entry starts a subprocess; the quickstart fixture trains
@pytest.mark.parametrize("command", list(TABLE), ids=[f"{i:02d} {c[:70]}" for i, c in enumerate(TABLE)])
def test_documented_command(command, tmp_path, request):
  entry = TABLE[command]
  if isinstance(entry, Skip):
    pytest.skip(entry.reason)
  if isinstance(entry, Covered):
    pytest.skip(f"{entry.why}, run as: " + "; ".join(entry.by))
  if command in FIXTURE_RUNS:
    _, line, problems = request.getfixturevalue(FIXTURE_RUNS[command])
  else:
    _link_inputs(tmp_path, request.getfixturevalue("inputs"), command)
    for fixture, needed in (("quickstart", "runs/quickstart" in command or "--input=model.safetensors" in command
                             or command.endswith(" model.safetensors")),
                            ("cnn_digits", "runs/cnn_digits" in command),
                            ("mae_digits", re.search(r"runs/mae_digits(/|\s|$)", command) is not None)):
      if not needed:
        continue
      run, run_line, run_problems = request.getfixturevalue(fixture)
      if run_problems:
        pytest.fail(f"needs the {fixture} run, which failed: {run_line}\n" + "\n".join(run_problems))
      _link_inputs(tmp_path, run, command)
    line, result, error = run_entry(command, entry, tmp_path)
    problems = [error] if error else problems_of(entry, result, tmp_path)
  if entry.bug:
    if problems:
      pytest.xfail(f"known bug: {entry.bug}")
    pytest.fail(f"{command!r} runs now: drop bug= from its TABLE entry ({entry.bug})")
  assert not problems, f"{line}\n" + "\n".join(problems)
