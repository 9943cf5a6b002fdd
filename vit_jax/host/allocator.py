"""CPU hosts: a process allocator that keeps XLA's per-step buffers, chosen at start by re-executing once.

XLA:CPU allocates every execution's temporary buffers afresh; glibc serves blocks that large with their own mmap
and unmaps them on free, so each step faults every 4 KiB page in again (docs/benchmarks.md has the cost). An
allocator is chosen when the process starts (`LD_PRELOAD`, `GLIBC_TUNABLES`), so on CPU hosts the training and
benchmark CLIs call `reexec_with_fast_allocator` first thing (through `vit_jax.host`): it replaces the process by
the same command (same pid) with the environment below, before flags are parsed or devices exist.

`VIT_JAX_ALLOCATOR` picks (default `auto`):
- `mimalloc`: preload the `cmeel-mimalloc` wheel's library (a vit_jax dependency on Linux) with
  `MIMALLOC_PURGE_DELAY=-1`, so freed memory stays with the process and the next step reuses it (the process
  keeps its peak memory mapped).
- `glibc`: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, transparent huge pages in `madvise` mode): the
  blocks still come and go every step, but on 2 MiB pages.
- `system`: the process runs as started.
- `auto`: `mimalloc` where its library is installed, else `glibc` where it applies, else `system`.

The user's own settings win: an `LD_PRELOAD` that already names an allocator library (a file name containing
`malloc`), a `GLIBC_TUNABLES` that sets `glibc.malloc.hugetlb`, and `MIMALLOC_*` variables already set are kept.
The restarted process puts the variables back as the user had them (the library is loaded and glibc has read its
tunables by then), so subprocesses, the benchmark's timm peer among them, start in the user's environment. Off
Linux nothing changes; on GPU and TPU hosts `vit_jax.host` does not call it.
"""
import importlib.metadata
import json
import os
import platform
import re
import sys
from typing import Mapping, Optional, Tuple

from vit_jax.errors import UserError, run_cli

CHOICE_VARIABLE = "VIT_JAX_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "glibc", "system")
RESTART_VARIABLE = "VIT_JAX_ALLOCATOR_RESTART"  # set only between the exec and the restore
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}  # never hand freed memory back: next step's buffers reuse it
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent huge page mode (`always`, `madvise` or `never`: the bracketed word), or None."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple]:
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return None
  return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def mimalloc_library() -> Optional[str]:
  """Path of the `cmeel-mimalloc` wheel's shared library (`libmimalloc.so.<major>`), or None if not installed."""
  try:
    files = importlib.metadata.distribution("cmeel-mimalloc").files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if re.fullmatch(r"libmimalloc\.so\.\d+", file.name):
      path = str(file.locate())
      return path if os.path.exists(path) else None
  return None


def _preloads_an_allocator(environ: Mapping[str, str]) -> bool:
  entries = re.split(r"[:\s]+", environ.get("LD_PRELOAD", ""))
  return any("malloc" in os.path.basename(entry) for entry in entries if entry)


def _tunables_with_huge_pages(tunables: Optional[str]) -> Optional[str]:
  """`GLIBC_TUNABLES` with `glibc.malloc.hugetlb=1` added, or None when it already names that tunable."""
  entries = [entry for entry in (tunables or "").split(":") if entry]
  if any(entry.partition("=")[0] == HUGE_PAGE_TUNABLE for entry in entries):
    return None
  return ":".join(entries + [f"{HUGE_PAGE_TUNABLE}=1"])


def allocator_environment(environ: Mapping[str, str], *, system: str, glibc: Optional[tuple], thp: Optional[str],
                          mimalloc: Optional[str]) -> Optional[dict]:
  """The environment to re-execute with, or None when this process should run as it is.

  `system`, `glibc`, `thp` and `mimalloc` describe the host (`platform.system()`, `glibc_version()`, `thp_mode()`,
  `mimalloc_library()`), so that the rule is testable anywhere.
  """
  choice = environ.get(CHOICE_VARIABLE, "auto") or "auto"
  if choice not in CHOICES:
    raise UserError(f"{CHOICE_VARIABLE}={choice!r} is not an allocator choice; use one of {', '.join(CHOICES)}")
  if mimalloc is not None and re.search(r"[\s:]", mimalloc):
    mimalloc = None  # LD_PRELOAD splits paths at spaces and colons: this one cannot be preloaded
  if RESTART_VARIABLE in environ or system != "Linux" or choice == "system" or _preloads_an_allocator(environ):
    return None  # already re-executed, nothing to do, or the user's own allocator
  if choice == "mimalloc" and mimalloc is None:
    raise UserError(f"{CHOICE_VARIABLE}=mimalloc but no cmeel-mimalloc library can be preloaded (the package is "
                    "not installed, or its path has a space or colon); `pip install cmeel-mimalloc` into a venv "
                    "whose path has neither, or choose auto, glibc or system")
  changes = {}
  if choice in ("auto", "mimalloc") and mimalloc is not None:
    chosen = "mimalloc"
    changes["LD_PRELOAD"] = ":".join(filter(None, [mimalloc, environ.get("LD_PRELOAD")]))
    changes.update({name: value for name, value in MIMALLOC_SETTINGS.items() if name not in environ})
  elif glibc is not None and glibc >= MIN_GLIBC and thp == "madvise":  # glibc, or auto without mimalloc
    chosen = "glibc huge pages"
    tunables = _tunables_with_huge_pages(environ.get("GLIBC_TUNABLES"))
    if tunables is not None:
      changes["GLIBC_TUNABLES"] = tunables
  if not changes:
    return None
  restart = {"allocator": chosen, "before": {name: environ.get(name) for name in changes}}
  return dict(environ, **changes, **{RESTART_VARIABLE: json.dumps(restart, sort_keys=True)})


def restored_environment(environ: Mapping[str, str]) -> Tuple[dict, Optional[str]]:
  """The restarted process's environment as the user started it, and the allocator it was restarted with."""
  result = dict(environ)
  restart = json.loads(result.pop(RESTART_VARIABLE, "null"))
  if restart is None:
    return result, None
  for name, value in restart["before"].items():
    if value is None:
      result.pop(name, None)
    else:
      result[name] = value
  return result, restart["allocator"]


def describe(restarted_with: Optional[str] = None) -> str:
  """Which allocator this process runs with: `mimalloc` (however it was preloaded), `glibc huge pages`, or
  `system`; `restarted_with` is what `reexec_with_fast_allocator` returned."""
  try:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
      if "libmimalloc" in f.read():
        return "mimalloc"
  except OSError:
    pass
  if restarted_with == "glibc huge pages" or (
      f"{HUGE_PAGE_TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")):
    return "glibc huge pages"
  return "system"


def reexec_with_fast_allocator() -> Optional[str]:
  """Replaces this process by the same command with the allocator's environment, where it helps (module docstring).

  Call it first thing in a CLI's entry point: the new process starts over; the exec keeps the process id, open files
  and the rest of the environment. Returns, in the restarted process, the allocator it was restarted with (None
  when it was not). A bad `VIT_JAX_ALLOCATOR` ends the command with an `error:` line, exit code 2.
  """
  if RESTART_VARIABLE in os.environ:  # the restarted process: give subprocesses the user's environment back
    environ, restarted_with = restored_environment(os.environ)
    for name in set(os.environ) - set(environ):
      del os.environ[name]
    os.environ.update(environ)
    return restarted_with
  environ = run_cli(allocator_environment, os.environ, system=platform.system(), glibc=glibc_version(),
                    thp=thp_mode(), mimalloc=mimalloc_library())
  if environ is None:
    return None
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
