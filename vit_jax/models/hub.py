"""Hugging Face hub names (`hf://...`) resolved to local paths through huggingface_hub's download cache.

Forms: `hf://ORG/REPO` (the repo's snapshot directory: its *.json, *.safetensors, *.npz and *.txt files) and
`hf://ORG/REPO/path/in/repo.npz` (one file; more than two components name a file), each with an optional
`@REVISION` (branch, tag or commit hash) after REPO: `hf://ORG/REPO@v1`, `hf://ORG/REPO@v1/sub/file.safetensors`.
Online, a name downloads into (or is reused from) the cache (HF_HOME / HF_HUB_CACHE); with HF_HUB_OFFLINE=1, or
when the hub cannot be reached, only the cache is used. PyTorch pickles (*.bin, *.pth) are refused, never loaded.
"""
import os
import sys

from vit_jax.errors import UserError

PREFIX = "hf://"
FORM = "hf://ORG/REPO[@REVISION][/FILE]"
# What a repo snapshot fetches: configs, weights vit_jax reads, label lists; never the PyTorch pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.npz", "*.txt"]
WEIGHT_SUFFIXES = (".safetensors", ".npz")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_name(path):
  """True for a `hf://` name."""
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(name):
  """(repo_id, revision or None, file path in the repo or None) of a `hf://` name; UserError when ill-formed."""
  rest = name[len(PREFIX):].rstrip("/") if is_hub_name(name) else ""
  parts = rest.split("/")
  if len(parts) < 2 or not all(parts) or "@" in parts[0]:
    raise UserError(f"{name!r} is not a hub name; expected {FORM}, e.g. hf://google/vit-base-patch16-224")
  repo, at, revision = parts[1].partition("@")
  if not repo or (at and not revision):
    raise UserError(f"{name!r} is not a hub name; expected {FORM} (REVISION: a branch, tag or commit hash)")
  filename = "/".join(parts[2:]) or None
  return f"{parts[0]}/{repo}", revision or None, filename


def _pickle_error(name, files, single=False):
  listed = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
  what = "names a PyTorch pickle" if single else f"holds only PyTorch pickles ({listed})"
  return UserError(f"{name} {what}; vit_jax never unpickles: convert it to safetensors (transformers' "
                   "`save_pretrained(..., safe_serialization=True)`, or safetensors' `save_file` on a timm state dict) "
                   "and pass that")


def _network_errors():
  """What a failed hub request raises: OSError (connection and timeout errors, requests' errors, the hub's HTTP and
  cache-miss errors) and the base error of the HTTP client the installed huggingface_hub uses (httpx2 or httpx)."""
  errors = [OSError]
  for module in ("httpx2", "httpx"):
    if module in sys.modules:
      errors.append(sys.modules[module].HTTPError)
  return tuple(errors)


def _reason(error):
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def _fetch(hub, repo_id, revision, filename, cache_dir, local_files_only):
  if filename is None:
    return hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=local_files_only)
  return hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only)


def _hub_error(hub, name, repo_id, revision, filename, error):
  """A UserError for what the hub answered about the name itself (missing, gated, no access), else None."""
  errors = hub.errors
  at = f" at revision {revision!r}" if revision else ""
  if isinstance(error, errors.LocalEntryNotFoundError):
    return None  # a cache miss after a failed request: the hub was not reached
  if isinstance(error, errors.RevisionNotFoundError):
    return UserError(f"{name}: repo {repo_id} has no revision {revision!r} on the hub ({_reason(error)})")
  if isinstance(error, errors.GatedRepoError):
    return UserError(f"{name}: repo {repo_id} is gated: accept its terms on huggingface.co and log in "
                     "(`hf auth login` or HF_TOKEN) to download it")
  if isinstance(error, errors.RepositoryNotFoundError):
    return UserError(f"{name}: repo {repo_id} does not exist on the hub or is private (a private repo needs "
                     "`hf auth login` or HF_TOKEN)")
  # huggingface_hub>=1 names a missing remote file RemoteEntryNotFoundError; before, EntryNotFoundError was HTTP's.
  missing_file = getattr(errors, "RemoteEntryNotFoundError", None) or errors.EntryNotFoundError
  if isinstance(error, missing_file):
    return UserError(f"{name}: repo {repo_id}{at} has no file {filename!r}")
  response = getattr(error, "response", None)
  if isinstance(error, errors.HfHubHTTPError) and getattr(response, "status_code", None) in (401, 403):
    return UserError(f"{name}: the hub refused access to repo {repo_id} (HTTP {response.status_code}); log in "
                     "(`hf auth login` or HF_TOKEN) with an account that may read it")
  return None


def _check_weights(hub, name, repo_id, revision, path, online, cache_dir):
  """Raises unless the snapshot at `path` holds weights vit_jax reads; names the pickles a repo holds instead."""
  files = [os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path) for f in names]
  if any(f.endswith(WEIGHT_SUFFIXES) for f in files):
    return
  listed = None
  if online:  # the snapshot skipped the pickles (ALLOW_PATTERNS): only the repo's own listing shows them
    try:
      listed = list(hub.list_repo_files(repo_id, revision=revision))
    except _network_errors():
      pass
  pickles = [f for f in (listed or []) + files if f.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise _pickle_error(name, set(pickles))
  if listed is not None:
    raise UserError(f"{name}: repo {repo_id} holds no *.safetensors or *.npz weights; pass a repo or file with them")
  raise UserError(f"{name}: the local cache ({cache_dir}) holds no *.safetensors or *.npz weights for it (snapshot "
                  f"{path}); run `hf download {repo_id}` on a machine with internet and copy the cache here, or pass a "
                  "local directory or file")


def resolve(name, cache_dir=None):
  """The local path of a `hf://` name: the repo's snapshot directory, or the one file it names.

  `cache_dir`: the hub cache to use (default: huggingface_hub's HF_HUB_CACHE). Downloads online; from the cache
  alone with HF_HUB_OFFLINE=1 or when the hub cannot be reached. UserError for an ill-formed name, a repo or
  revision the hub does not have (or denies), a name neither reachable nor cached, and a repo of PyTorch pickles.
  """
  repo_id, revision, filename = parse(name)
  if filename is not None and filename.endswith(PICKLE_SUFFIXES):
    raise _pickle_error(name, [filename], single=True)
  try:
    import huggingface_hub as hub  # pylint: disable=import-outside-toplevel  # only `hf://` names need it
    import huggingface_hub.constants  # pylint: disable=import-outside-toplevel,unused-import  # lazy submodules
    import huggingface_hub.errors  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise UserError(f"{name}: hub names need huggingface_hub ({e}); pip install huggingface_hub") from e
  cache_dir = str(cache_dir or hub.constants.HF_HUB_CACHE)
  # The hub reads HF_HUB_OFFLINE once, at import: a variable set later is honoured here too.
  offline = hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
  path, online = None, False
  reason = "HF_HUB_OFFLINE=1 is set" if offline else None
  try:
    if not offline:
      try:
        path = _fetch(hub, repo_id, revision, filename, cache_dir, local_files_only=False)
        online = True
      except _network_errors() as e:
        error = _hub_error(hub, name, repo_id, revision, filename, e)
        if error is not None:
          raise error from e
        reason = _reason(e)  # the hub could not be reached (or failed): the cache may still hold it
    if path is None:
      try:
        path = _fetch(hub, repo_id, revision, filename, cache_dir, local_files_only=True)
      except hub.errors.LocalEntryNotFoundError as e:
        fetch = f"hf download {repo_id}" + (f" {filename}" if filename else "") + (
            f" --revision {revision}" if revision else "")
        raise UserError(f"{name} is not in the local hub cache ({cache_dir}) and the hub could not be reached "
                        f"({reason}); run `{fetch}` on a machine with internet and copy its cache here (or set "
                        "HF_HUB_CACHE to it), or pass a local directory or file") from e
  except hub.errors.HFValidationError as e:  # a repo id or revision the hub's client rejects
    raise UserError(f"{name!r} is not a valid hub name ({_reason(e)}); expected {FORM}") from e
  if filename is None:
    _check_weights(hub, name, repo_id, revision, path, online, cache_dir)
  return path
