"""A local server that speaks the Hugging Face Hub's URL layout (`fake_hub`,
registered for every test by tests/conftest.py), and the published timm /
transformers state-dict layouts written out from their module definitions."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse

import jax
import numpy as np
import pytest
import scipy.special


class FakeHub(http.server.ThreadingHTTPServer):
  """The Hub's /{repo}/resolve/{revision}/{file} layout, HEAD and GET."""

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.repos: dict[str, dict] = {}
    self.log: list[tuple[str, str]] = []

  def add(self, repo: str, files: dict[str, bytes | str], *, gated: bool = False,
          tags: tuple[str, ...] = ()) -> str:
    commit = hashlib.sha1(repo.encode()).hexdigest()
    self.repos[repo] = {"files": files, "gated": gated,
                        "revisions": {"main", commit, *tags}, "commit": commit}
    return commit

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):  # quiet
    pass

  def _error(self, code: int, error_code: str, commit: str | None = None):
    self.send_response(code)
    self.send_header("X-Error-Code", error_code)
    self.send_header("X-Error-Message", error_code)
    if commit:
      self.send_header("X-Repo-Commit", commit)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def _serve(self, body: bool):
    server: FakeHub = self.server
    server.log.append((self.command, self.path))
    parts = self.path.split("?")[0].split("/")
    if len(parts) < 6 or parts[3] != "resolve":
      return self._error(404, "RepoNotFound")
    repo = f"{parts[1]}/{parts[2]}"
    rev = urllib.parse.unquote(parts[4])
    filename = urllib.parse.unquote("/".join(parts[5:]))
    entry = server.repos.get(repo)
    if entry is None:
      return self._error(404, "RepoNotFound")
    if entry["gated"]:
      return self._error(401, "GatedRepo")
    if rev not in entry["revisions"]:
      return self._error(404, "RevisionNotFound")
    if filename not in entry["files"]:
      return self._error(404, "EntryNotFound", entry["commit"])
    data = entry["files"][filename]
    if isinstance(data, str):
      with open(data, "rb") as f:
        data = f.read()
    self.send_response(200)
    self.send_header("X-Repo-Commit", entry["commit"])
    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if body:
      self.wfile.write(data)

  def do_HEAD(self):
    self._serve(body=False)

  def do_GET(self):
    self._serve(body=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
  server = FakeHub()
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  yield server
  server.shutdown()
  server.server_close()


def _stop(server: FakeHub) -> None:
  server.shutdown()
  server.server_close()


# --- published layouts, written out from timm / transformers -----------------

def _bn(sd, name, c):
  sd.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
             f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})


def timm_resnet_shapes(depth: int, num_classes: int = 1000) -> dict[str, tuple]:
  """timm.models.resnet.ResNet (resnet18: BasicBlock 2-2-2-2, resnet50: Bottleneck 3-4-6-3)."""
  blocks, exp = {18: ((2, 2, 2, 2), 1), 50: ((3, 4, 6, 3), 4)}[depth]
  sd = {"conv1.weight": (64, 3, 7, 7)}
  _bn(sd, "bn1", 64)
  inplanes = 64
  for s, n in enumerate(blocks):
    planes = 64 * 2 ** s
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      if exp == 1:
        sd[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
        _bn(sd, f"{p}.bn1", planes)
        sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        _bn(sd, f"{p}.bn2", planes)
      else:
        sd[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
        _bn(sd, f"{p}.bn1", planes)
        sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        _bn(sd, f"{p}.bn2", planes)
        sd[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
        _bn(sd, f"{p}.bn3", planes * 4)
      if b == 0 and (s > 0 or inplanes != planes * exp):
        sd[f"{p}.downsample.0.weight"] = (planes * exp, inplanes, 1, 1)
        _bn(sd, f"{p}.downsample.1", planes * exp)
      inplanes = planes * exp
  sd.update({"fc.weight": (num_classes, inplanes), "fc.bias": (num_classes,)})
  return sd


def timm_vit_shapes(width: int, depth: int, patch: int = 16, image: int = 224,
                    num_classes: int = 1000) -> dict[str, tuple]:
  """timm.models.vision_transformer.VisionTransformer (class token, fused qkv)."""
  n = (image // patch) ** 2
  sd = {"cls_token": (1, 1, width), "pos_embed": (1, n + 1, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,)}
  for i in range(depth):
    p = f"blocks.{i}"
    sd.update({f"{p}.norm1.weight": (width,), f"{p}.norm1.bias": (width,),
               f"{p}.attn.qkv.weight": (3 * width, width), f"{p}.attn.qkv.bias": (3 * width,),
               f"{p}.attn.proj.weight": (width, width), f"{p}.attn.proj.bias": (width,),
               f"{p}.norm2.weight": (width,), f"{p}.norm2.bias": (width,),
               f"{p}.mlp.fc1.weight": (4 * width, width), f"{p}.mlp.fc1.bias": (4 * width,),
               f"{p}.mlp.fc2.weight": (width, 4 * width), f"{p}.mlp.fc2.bias": (width,)})
  sd.update({"norm.weight": (width,), "norm.bias": (width,),
             "head.weight": (num_classes, width), "head.bias": (num_classes,)})
  return sd


# timm arch_def strings: (block type, repeats, kernel, expand, out channels).
TIMM_EFFNETS = {
    "mobilenetv2_100": [("ds", 1, 3, 1, 16), ("ir", 2, 3, 6, 24), ("ir", 3, 3, 6, 32),
                        ("ir", 4, 3, 6, 64), ("ir", 3, 3, 6, 96), ("ir", 3, 3, 6, 160),
                        ("ir", 1, 3, 6, 320)],
    "tf_efficientnet_lite0": [("ds", 1, 3, 1, 16), ("ir", 2, 3, 6, 24), ("ir", 2, 5, 6, 40),
                              ("ir", 3, 3, 6, 80), ("ir", 3, 5, 6, 112),
                              ("ir", 4, 5, 6, 192), ("ir", 1, 3, 6, 320)],
}


def timm_effnet_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple]:
  """timm.models._efficientnet_blocks DepthwiseSeparableConv / InvertedResidual."""
  sd = {"conv_stem.weight": (32, 3, 3, 3)}
  _bn(sd, "bn1", 32)
  cin = 32
  for s, (kind, repeats, k, e, cout) in enumerate(TIMM_EFFNETS[arch]):
    for b in range(repeats):
      p = f"blocks.{s}.{b}"
      if kind == "ds":
        sd[f"{p}.conv_dw.weight"] = (cin, 1, k, k)
        _bn(sd, f"{p}.bn1", cin)
        sd[f"{p}.conv_pw.weight"] = (cout, cin, 1, 1)
        _bn(sd, f"{p}.bn2", cout)
      else:
        mid = cin * e
        sd[f"{p}.conv_pw.weight"] = (mid, cin, 1, 1)
        _bn(sd, f"{p}.bn1", mid)
        sd[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
        _bn(sd, f"{p}.bn2", mid)
        sd[f"{p}.conv_pwl.weight"] = (cout, mid, 1, 1)
        _bn(sd, f"{p}.bn3", cout)
      cin = cout
  sd["conv_head.weight"] = (1280, cin, 1, 1)
  _bn(sd, "bn2", 1280)
  sd.update({"classifier.weight": (num_classes, 1280), "classifier.bias": (num_classes,)})
  return sd


def hf_bert_pretraining_shapes(hidden=768, layers=12, inter=3072, vocab=30522,
                               max_pos=512) -> dict[str, tuple]:
  """transformers BertForPreTraining as google-bert/bert-base-uncased stores it
  (LayerNorm gamma/beta, pooler, cls.* pretraining heads)."""
  sd = {"bert.embeddings.word_embeddings.weight": (vocab, hidden),
        "bert.embeddings.position_embeddings.weight": (max_pos, hidden),
        "bert.embeddings.token_type_embeddings.weight": (2, hidden),
        "bert.embeddings.LayerNorm.gamma": (hidden,), "bert.embeddings.LayerNorm.beta": (hidden,)}
  for i in range(layers):
    p = f"bert.encoder.layer.{i}"
    for m in ("query", "key", "value"):
      sd.update({f"{p}.attention.self.{m}.weight": (hidden, hidden),
                 f"{p}.attention.self.{m}.bias": (hidden,)})
    sd.update({f"{p}.attention.output.dense.weight": (hidden, hidden),
               f"{p}.attention.output.dense.bias": (hidden,),
               f"{p}.attention.output.LayerNorm.gamma": (hidden,),
               f"{p}.attention.output.LayerNorm.beta": (hidden,),
               f"{p}.intermediate.dense.weight": (inter, hidden),
               f"{p}.intermediate.dense.bias": (inter,),
               f"{p}.output.dense.weight": (hidden, inter), f"{p}.output.dense.bias": (hidden,),
               f"{p}.output.LayerNorm.gamma": (hidden,), f"{p}.output.LayerNorm.beta": (hidden,)})
  sd.update({"bert.pooler.dense.weight": (hidden, hidden), "bert.pooler.dense.bias": (hidden,),
             "cls.predictions.bias": (vocab,),
             "cls.predictions.transform.dense.weight": (hidden, hidden),
             "cls.predictions.transform.dense.bias": (hidden,),
             "cls.predictions.transform.LayerNorm.gamma": (hidden,),
             "cls.predictions.transform.LayerNorm.beta": (hidden,),
             "cls.seq_relationship.weight": (2, hidden), "cls.seq_relationship.bias": (2,)})
  return sd


def _zeros(shapes):
  return {k: np.zeros(s, np.int64 if k.endswith("num_batches_tracked") else np.float32)
          for k, s in shapes.items()}


def _random(shapes, seed=0, scale=0.2):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def _like(spec, num_classes=None):
  module = spec.build(num_classes=spec.default_num_classes if num_classes is None
                      else num_classes)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), spec.example_input(1))
  return module, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _timm_config(arch, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 crop=0.95, num_classes=1000, **extra):
  return json.dumps({
      "architecture": arch, "num_classes": num_classes, "num_features": 0,
      "pretrained_cfg": {"tag": "test", "input_size": [3, size, size],
                         "interpolation": "bicubic", "crop_pct": crop,
                         "crop_mode": "center", "mean": list(mean), "std": list(std),
                         "num_classes": num_classes}, **extra}).encode()


def _timm_vit_reference(sd, x, heads):
  """timm VisionTransformer.forward in numpy (exact GELU, LayerNorm eps 1e-6)."""
  def ln(v, p):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]
  w = sd["patch_embed.proj.weight"]
  width, _, p, _ = w.shape
  b, h, wd, _ = x.shape
  patches = x.reshape(b, h // p, p, wd // p, p, 3).transpose(0, 1, 3, 5, 2, 4)
  t = np.einsum("bghcij,dcij->bghd", patches, w).reshape(b, -1, width)
  t = t + sd["patch_embed.proj.bias"]
  t = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, width)), t], 1) + sd["pos_embed"]
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    q = f"blocks.{i}"
    y = ln(t, f"{q}.norm1")
    qkv = (y @ sd[f"{q}.attn.qkv.weight"].T + sd[f"{q}.attn.qkv.bias"]).reshape(
        b, -1, 3, heads, width // heads).transpose(2, 0, 3, 1, 4)
    att = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (width // heads) ** -0.5
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, width)
    t = t + y @ sd[f"{q}.attn.proj.weight"].T + sd[f"{q}.attn.proj.bias"]
    y = ln(t, f"{q}.norm2") @ sd[f"{q}.mlp.fc1.weight"].T + sd[f"{q}.mlp.fc1.bias"]
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    t = t + y @ sd[f"{q}.mlp.fc2.weight"].T + sd[f"{q}.mlp.fc2.bias"]
    i += 1
  return ln(t, "norm")[:, 0] @ sd["head.weight"].T + sd["head.bias"]
