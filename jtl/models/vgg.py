"""VGG-16 (no BatchNorm) in the torchvision layout.

Inputs are float NHWC images normalised with the ImageNet mean/std
(`jtl.models.resnet.preprocess`). Parameter paths: "block1/conv1/kernel" ..
"block5/conv3/kernel", "fc6/kernel", "fc7/kernel", "head/kernel". As in
torchvision, the last feature map is average-pooled to 7x7 (adaptively, so any
input of at least 32 px works) before the fully connected layers. `features`
returns the 4096-d fc7 activations, the usual VGG features for linear probes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.models import registry, resnet, wgrad

# Convs per block and their width, for VGG-16 ("D" in the paper).
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
POOL_SIZE = 7


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging weights of torch's AdaptiveAvgPool over one axis.

  >>> adaptive_pool_matrix(3, 2).tolist()
  [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
  """
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """torch's AdaptiveAvgPool2d((out, out)) on NHWC.

  Each output row / column is the mean of a static slice, concatenated: an
  einsum with the pooling matrices is converted by TensorFlow's LiteRT
  converter into a SUM and TRANSPOSE that fail to prepare when the map is
  1x1 (VGG at 32 px).
  """
  if x.shape[1:3] == (out, out):
    return x
  return _pool_axis(_pool_axis(x, 1, out), 2, out)


def _pool_axis(x: jax.Array, axis: int, out: int) -> jax.Array:
  """Adaptive average pooling of one axis to `out` (windows as `adaptive_pool_matrix`)."""
  size = x.shape[axis]
  parts = []
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    window = jax.lax.slice_in_dim(x, start, end, axis=axis)
    parts.append(window if end - start == 1 else jnp.mean(window, axis=axis, keepdims=True))
  return jnp.concatenate(parts, axis=axis)


class Block(nn.Module):
  """`count` 3x3 convs with ReLU, then a 2x2 max pool."""
  count: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for c in range(self.count):
      x = nn.relu(wgrad.Conv(self.width, (3, 3), padding=[(1, 1), (1, 1)],
                          name=f"conv{c + 1}")(x))
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
  """VGG with torchvision's classifier (4096-4096-num_classes, dropout 0.5).

  Attributes:
    num_classes: size of the head; 0 returns the fc7 features.
    blocks: (convs, width) per block.
  """
  num_classes: int = 1000
  blocks: tuple[tuple[int, int], ...] = VGG16_BLOCKS
  dropout: float = 0.5

  def setup(self):
    for b, (count, width) in enumerate(self.blocks):
      setattr(self, f"block{b + 1}", Block(count, width))
    self.fc6 = wgrad.Dense(4096)
    self.fc7 = wgrad.Dense(4096)
    self.drop = nn.Dropout(self.dropout)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """fc7 activations (after ReLU and dropout), float32 [B, 4096]."""
    for b in range(len(self.blocks)):
      x = getattr(self, f"block{b + 1}")(x)
    x = adaptive_avg_pool(x, POOL_SIZE).reshape(x.shape[0], -1)
    x = self.drop(nn.relu(self.fc6(x)), deterministic=not train)
    x = self.drop(nn.relu(self.fc7(x)), deterministic=not train)
    return x.astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    return self.head(f).astype(jnp.float32) if self.num_classes else f


def torch_names(blocks=VGG16_BLOCKS) -> dict[str, str]:
  """torchvision module names ("features.0", "classifier.6") -> ours."""
  names, index = {}, 0
  for b, (count, _) in enumerate(blocks):
    for c in range(count):
      names[f"features.{index}"] = f"block{b + 1}/conv{c + 1}"
      index += 2  # conv, ReLU
    index += 1  # MaxPool
  names.update({"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "head"})
  return names


def convert_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a torchvision VGG-16 state dict to flat "params/..." paths.

  Conv weights go OIHW -> HWIO and Linear (out, in) -> (in, out). torch
  flattens the 512x7x7 map channel-first, we flatten it channel-last, so the
  rows of fc6's kernel are reordered to match. Unknown keys pass through.

  >>> sd = {"classifier.6.weight": np.zeros((10, 4096), np.float32)}
  >>> {k: v.shape for k, v in convert_torch(sd).items()}
  {'params/head/kernel': (4096, 10)}
  """
  names = torch_names()
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    path = names.get(module)
    if path is None or leaf not in ("weight", "bias"):
      out[key] = np.asarray(value)
      continue
    value = np.asarray(value)
    if leaf == "bias":
      out[f"params/{path}/bias"] = value
    elif value.ndim == 4:
      out[f"params/{path}/kernel"] = resnet.torch_conv_kernel(value)
    elif path == "fc6" and value.shape[1] % POOL_SIZE ** 2 == 0:
      channels = value.shape[1] // POOL_SIZE ** 2
      w = value.reshape(value.shape[0], channels, POOL_SIZE, POOL_SIZE)
      out["params/fc6/kernel"] = np.transpose(w, (2, 3, 1, 0)).reshape(-1, value.shape[0])
    else:
      out[f"params/{path}/kernel"] = value.T
  return out


example_input = registry.image_input


def groups(num_blocks: int) -> list[tuple[str, str]]:
  """Layer groups bottom to top: block1 .. block<num_blocks>, fc6, fc7, head."""
  return ([(f"block{b}", rf"block{b}/.*") for b in range(1, num_blocks + 1)]
          + [("fc6", r"fc6/.*"), ("fc7", r"fc7/.*"), ("head", r"head/.*")])


GROUPS = groups(len(VGG16_BLOCKS))


def built_groups(params: Mapping[str, Any]) -> list[tuple[str, str]]:
  """`groups` of a VGG as built (model_kwargs may set its blocks)."""
  return groups(registry.numbered(params, "block", start=1))



registry.register(registry.ModelSpec(
    name="vgg16",
    build=lambda num_classes=1000, **kw: VGG(num_classes=num_classes, **kw),
    **registry.image_inputs(resnet.NORMALIZATION),  # torchvision's evaluation
    groups=GROUPS, groups_of=built_groups,
    pretrained="vgg16/imagenet",
    converter=convert_torch,
))
