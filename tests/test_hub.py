"""`hf://` names resolved through a hub cache built by hand in huggingface_hub's layout; never the network (offline
mode, and any request the client still sends fails the test)."""
import os
import sys

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants, errors

from vit_jax.errors import UserError
from vit_jax.models import hub

COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


class _NoNetwork(Exception):
  """A request reached the HTTP client: not an error the code under test may catch (it is no OSError)."""


@pytest.fixture(name="cache")
def _cache(tmp_path, monkeypatch):
  """An empty hub cache under HF_HOME, offline: huggingface_hub read both at import, so its constants are set too."""
  home = tmp_path / "hf"
  cache = home / "hub"
  cache.mkdir(parents=True)
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

  def no_network(self, request, *args, **kwargs):
    raise _NoNetwork(f"test sent a request: {request.url}")
  monkeypatch.setattr(httpx2.Client, "send", no_network)
  return cache


def _online(monkeypatch):
  """Online mode as far as the code can tell: the hub's flag and the variable off."""
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.delenv("HF_HUB_OFFLINE")


def _put(cache, repo_id, files, ref="main", commit=COMMIT):
  """A cached snapshot of `repo_id`: refs/<ref> holding the commit, snapshots/<commit>/<files> (no blobs)."""
  root = cache / f"models--{repo_id.replace('/', '--')}"
  (root / "refs").mkdir(parents=True, exist_ok=True)
  (root / "refs" / ref).write_text(commit)
  snapshot = root / "snapshots" / commit
  for rel, data in files.items():
    (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
    (snapshot / rel).write_bytes(data)
  return snapshot


VIT_FILES = {"config.json": b'{"model_type": "vit"}', "model.safetensors": b"weights", "sub/file.npz": b"npz"}


def _fail_online(monkeypatch, error):
  """snapshot_download / hf_hub_download raise `error` when asked to go online; from the cache they run as is."""
  calls = []

  def wrap(real):
    def fake(*args, **kwargs):
      calls.append(kwargs.get("local_files_only"))
      if not kwargs.get("local_files_only"):
        raise error
      return real(*args, **kwargs)
    return fake
  monkeypatch.setattr(huggingface_hub, "snapshot_download", wrap(huggingface_hub.snapshot_download))
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", wrap(huggingface_hub.hf_hub_download))
  return calls


def _response(status):
  return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/repo"))


def test_is_hub_name():
  assert hub.is_hub_name("hf://org/repo")
  assert not hub.is_hub_name("org/repo")
  assert not hub.is_hub_name("/tmp/hf://x")
  assert not hub.is_hub_name(None)


def test_parse():
  assert hub.parse("hf://org/repo") == ("org/repo", None, None)
  assert hub.parse("hf://org/repo/") == ("org/repo", None, None)
  assert hub.parse("hf://org/repo@v1") == ("org/repo", "v1", None)
  assert hub.parse("hf://org/repo@v1/sub/file.npz") == ("org/repo", "v1", "sub/file.npz")
  assert hub.parse("hf://org/repo/model.safetensors") == ("org/repo", None, "model.safetensors")


@pytest.mark.parametrize("name", ["hf://", "hf://onlyorg", "hf://org//file.npz", "hf://org/repo@", "hf://@x/repo",
                                  "hf://org/@v1", "org/repo"])
def test_ill_formed_names(name, cache):
  with pytest.raises(UserError, match=r"expected hf://ORG/REPO\[@REVISION\]\[/FILE\]"):
    hub.resolve(name)
  assert not any(cache.iterdir())  # rejected before the hub was asked


def test_name_the_hub_rejects(cache):
  del cache
  with pytest.raises(UserError, match=r"not a valid hub name.*expected hf://ORG/REPO"):
    hub.resolve("hf://org/re po")


def test_cached_repo_resolves_to_its_snapshot(cache):
  snapshot = _put(cache, "org/repo", VIT_FILES)
  path = hub.resolve("hf://org/repo")
  assert os.path.realpath(path) == os.path.realpath(snapshot)
  assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "sub"]


def test_npz_only_repo_resolves(cache):
  snapshot = _put(cache, "org/npz", {"ViT-B_16.npz": b"npz"})
  assert os.path.realpath(hub.resolve("hf://org/npz")) == os.path.realpath(snapshot)


def test_file_name_resolves_to_the_file(cache):
  _put(cache, "org/repo", VIT_FILES)
  path = hub.resolve("hf://org/repo/sub/file.npz")
  assert os.path.isfile(path) and path.endswith(os.path.join("sub", "file.npz"))
  with open(path, "rb") as f:
    assert f.read() == b"npz"


def test_revision_follows_its_ref(cache):
  _put(cache, "org/repo", VIT_FILES)  # main
  tagged = _put(cache, "org/repo", {"config.json": b"{}", "model.safetensors": b"v1"}, ref="v1", commit=OTHER_COMMIT)
  assert os.path.realpath(hub.resolve("hf://org/repo@v1")) == os.path.realpath(tagged)
  with open(hub.resolve("hf://org/repo@v1/model.safetensors"), "rb") as f:
    assert f.read() == b"v1"
  # A commit hash needs no ref.
  assert os.path.realpath(hub.resolve(f"hf://org/repo@{OTHER_COMMIT}")) == os.path.realpath(tagged)
  with pytest.raises(UserError, match=r"hf://org/repo@v2 is not in the local hub cache"):
    hub.resolve("hf://org/repo@v2")


def test_explicit_cache_dir(cache, tmp_path):
  other = tmp_path / "other_cache"
  snapshot = _put(other, "org/repo", VIT_FILES)
  assert os.path.realpath(hub.resolve("hf://org/repo", cache_dir=other)) == os.path.realpath(snapshot)
  with pytest.raises(UserError, match="not in the local hub cache"):
    hub.resolve("hf://org/repo")  # the default cache (the fixture's) does not hold it
  del cache


@pytest.mark.parametrize("name, command", [
    ("hf://org/missing", "hf download org/missing"),
    ("hf://org/missing@v3/w.npz", "hf download org/missing w.npz --revision v3"),
])
def test_uncached_name_offline(cache, name, command):
  with pytest.raises(UserError) as info:
    hub.resolve(name)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{name} is not in the local hub cache ({cache})")
  assert "HF_HUB_OFFLINE=1" in message and f"`{command}`" in message and "pass a local directory or file" in message


def test_uncached_file_of_a_cached_repo(cache):
  _put(cache, "org/repo", VIT_FILES)
  with pytest.raises(UserError, match=r"hf://org/repo/other.npz is not in the local hub cache"):
    hub.resolve("hf://org/repo/other.npz")


def test_cached_pickles_only(cache):
  _put(cache, "org/torch", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
  with pytest.raises(UserError, match=r"hf://org/torch holds only PyTorch pickles \(pytorch_model.bin\); vit_jax "
                                      r"never unpickles: convert it to safetensors.*safe_serialization=True"):
    hub.resolve("hf://org/torch")


def test_pickle_file_name_refused(cache):
  _put(cache, "org/torch", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
  with pytest.raises(UserError, match=r"hf://org/torch/pytorch_model.bin names a PyTorch pickle; vit_jax never"):
    hub.resolve("hf://org/torch/pytorch_model.bin")


def test_cached_snapshot_without_weights_offline(cache):
  _put(cache, "org/configonly", {"config.json": b"{}"})
  with pytest.raises(UserError, match=rf"local cache \({cache}\) holds no \*.safetensors or \*.npz weights for it.*"
                                      r"`hf download org/configonly`"):
    hub.resolve("hf://org/configonly")


def test_variable_set_after_import_keeps_it_offline(cache, monkeypatch):
  """HF_HUB_OFFLINE=1 in the environment but not in the hub's constant (set after its import): cache only."""
  snapshot = _put(cache, "org/repo", VIT_FILES)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the variable stays set
  calls = _fail_online(monkeypatch, AssertionError("went online"))
  assert os.path.realpath(hub.resolve("hf://org/repo")) == os.path.realpath(snapshot)
  assert calls == [True]


@pytest.mark.parametrize("error", [httpx2.ConnectError("connection refused"), httpx2.ReadTimeout("timed out"),
                                   TimeoutError("timed out"), ConnectionError("network is unreachable")])
def test_network_failure_falls_back_to_the_cache(cache, monkeypatch, error):
  snapshot = _put(cache, "org/repo", VIT_FILES)
  _online(monkeypatch)
  calls = _fail_online(monkeypatch, error)
  assert os.path.realpath(hub.resolve("hf://org/repo")) == os.path.realpath(snapshot)
  assert hub.resolve("hf://org/repo/sub/file.npz").endswith("file.npz")
  assert calls == [False, True, False, True]  # tried online first, then the cache


def test_network_failure_and_no_cache(cache, monkeypatch):
  _online(monkeypatch)
  _fail_online(monkeypatch, httpx2.ConnectError("connection refused"))
  with pytest.raises(UserError) as info:
    hub.resolve("hf://org/missing")
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"hf://org/missing is not in the local hub cache ({cache}) and the hub could not be "
                            "reached (ConnectError: connection refused)")
  assert "`hf download org/missing`" in message


def test_real_client_without_network_uses_the_cache(cache, monkeypatch):
  """huggingface_hub's own functions, online, with every request failing to connect: the cached snapshot."""
  snapshot = _put(cache, "org/repo", VIT_FILES)
  _online(monkeypatch)
  sent = []

  def refuse(self, request, *args, **kwargs):
    sent.append(str(request.url))
    raise httpx2.ConnectError("connection refused", request=request)
  monkeypatch.setattr(httpx2.Client, "send", refuse)
  monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
  assert os.path.realpath(hub.resolve("hf://org/repo")) == os.path.realpath(snapshot)
  assert sent  # it did try the hub
  with pytest.raises(UserError, match=r"hf://org/missing is not in the local hub cache .*ConnectError"):
    hub.resolve("hf://org/missing")


@pytest.mark.parametrize("name, error_type, status, pattern", [
    ("hf://org/repo", errors.RepositoryNotFoundError, 404,
     r"hf://org/repo: repo org/repo does not exist on the hub or is private"),
    ("hf://org/repo", errors.GatedRepoError, 403, r"hf://org/repo: repo org/repo is gated"),
    ("hf://org/repo", errors.HfHubHTTPError, 401,
     r"hf://org/repo: the hub refused access to repo org/repo \(HTTP 401\)"),
    ("hf://org/repo@v9", errors.RevisionNotFoundError, 404, r"hf://org/repo@v9: repo org/repo has no revision 'v9'"),
])
def test_hub_answers_about_the_repo(cache, monkeypatch, name, error_type, status, pattern):
  _put(cache, "org/repo", VIT_FILES)  # even a cached copy does not hide what the hub said
  _put(cache, "org/repo", VIT_FILES, ref="v9")
  _online(monkeypatch)
  _fail_online(monkeypatch, error_type("answer", response=_response(status)))
  with pytest.raises(UserError, match=pattern):
    hub.resolve(name)


def test_missing_file_in_a_reachable_repo(cache, monkeypatch):
  del cache
  _online(monkeypatch)
  _fail_online(monkeypatch, errors.RemoteEntryNotFoundError("404 file", response=_response(404)))
  with pytest.raises(UserError, match=r"hf://org/repo@v1/x.npz: repo org/repo at revision 'v1' has no file 'x.npz'"):
    hub.resolve("hf://org/repo@v1/x.npz")


def test_online_pickles_only_repo(cache, monkeypatch):
  """Online, the snapshot skips *.bin (allow_patterns): the repo's file list shows the pickles."""
  snapshot = _put(cache, "org/torch", {"config.json": b"{}"})
  _online(monkeypatch)
  asked = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(snapshot))

  def list_repo_files(repo_id, revision=None):
    asked.append((repo_id, revision))
    return ["config.json", "pytorch_model.bin", "README.md"]
  monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
  with pytest.raises(UserError, match=r"hf://org/torch@v1 holds only PyTorch pickles \(pytorch_model.bin\)"):
    hub.resolve("hf://org/torch@v1")
  assert asked == [("org/torch", "v1")]
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *args, **kwargs: ["config.json", "README.md"])
  with pytest.raises(UserError, match=r"hf://org/torch: repo org/torch holds no \*.safetensors or \*.npz weights"):
    hub.resolve("hf://org/torch")


def test_online_repo_with_weights_is_not_listed(cache, monkeypatch):
  snapshot = _put(cache, "org/repo", VIT_FILES)
  _online(monkeypatch)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(snapshot))
  monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *args, **kwargs: pytest.fail("listed the repo"))
  assert hub.resolve("hf://org/repo") == str(snapshot)


def test_without_huggingface_hub(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
  with pytest.raises(UserError, match=r"hf://org/repo: hub names need huggingface_hub .*pip install huggingface_hub"):
    hub.resolve("hf://org/repo")
