"""ResNet-18/34/50/101/152 in the torchvision layout (v1.5: stride in the 3x3).

Inputs are float NHWC images normalised with the ImageNet mean/std (see
`preprocess`). Parameter paths: "stem/conv/kernel", "stem/bn/scale",
"layer1_0/conv1/kernel", "layer1_0/bn1/scale", "layer1_0/downsample/conv/kernel",
..., "head/kernel"; BatchNorm statistics live under "batch_stats/.../mean"
and ".../var". `convert_torch` maps a torchvision state dict onto these.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError
from jtl.models import preprocessing, registry, wgrad
from jtl.models.conversion import convert_with_rules
from jtl.models.layers import BatchNorm, conv_general_dilated

IMAGENET_MEAN = np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(preprocessing.IMAGENET_STD, np.float32)
# torchvision's evaluation: resize 256, crop 224, ImageNet mean/std.
NORMALIZATION = preprocessing.model_normalization("imagenet")

# torchvision's BatchNorm2d: eps 1e-5, momentum 0.1 (= flax momentum 0.9).
_BatchNorm = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
_Conv = functools.partial(nn.Conv, use_bias=False,
                          conv_general_dilated=conv_general_dilated,
                          kernel_init=nn.initializers.variance_scaling(
                              2.0, "fan_out", "normal"))


# torchvision ImageNet evaluation preprocessing: crop, resize, mean/std:
# `preprocess(images, size=224, crop_fraction=0.875)`; size=None only normalises.
preprocess = NORMALIZATION.preprocessor()


class Stem(nn.Module):
  """7x7/2 conv, BatchNorm, ReLU, 3x3/2 max pool."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _Conv(64, (7, 7), strides=2, padding=[(3, 3), (3, 3)], name="conv")(x)
    x = nn.relu(_BatchNorm(name="bn")(x, use_running_average=not train))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])


class Downsample(nn.Module):
  """1x1 strided conv + BatchNorm on the shortcut."""
  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _Conv(self.features, (1, 1), strides=self.strides, name="conv")(x)
    return _BatchNorm(name="bn")(x, use_running_average=not train)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  strides: int = 1
  downsample: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # train positional: remat's static arg
    bn = lambda name: _BatchNorm(name=name)
    y = _Conv(self.features, (3, 3), strides=self.strides,
              padding=[(1, 1), (1, 1)], name="conv1")(x)
    y = nn.relu(bn("bn1")(y, use_running_average=not train))
    y = _Conv(self.features, (3, 3), padding=[(1, 1), (1, 1)], name="conv2")(y)
    y = bn("bn2")(y, use_running_average=not train)
    if self.downsample:
      x = Downsample(self.features, self.strides, name="downsample")(x, train=train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101/152)."""
  features: int
  strides: int = 1
  downsample: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # train positional: remat's static arg
    bn = lambda name: _BatchNorm(name=name)
    y = _Conv(self.features, (1, 1), name="conv1")(x)
    y = nn.relu(bn("bn1")(y, use_running_average=not train))
    y = _Conv(self.features, (3, 3), strides=self.strides,
              padding=[(1, 1), (1, 1)], name="conv2")(y)
    y = nn.relu(bn("bn2")(y, use_running_average=not train))
    y = _Conv(self.features * 4, (1, 1), name="conv3")(y)
    y = bn("bn3")(y, use_running_average=not train)
    if self.downsample:
      x = Downsample(self.features * 4, self.strides, name="downsample")(x, train=train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet with torchvision's layout and names.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    bottleneck: Bottleneck blocks (ResNet-50+) instead of BasicBlocks.
    remat: gradient checkpointing of every residual block: its activations
      are recomputed in the backward pass instead of kept (less memory, one
      more forward pass; same params, statistics and gradients).
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  remat: bool = False

  def setup(self):
    block = Bottleneck if self.bottleneck else BasicBlock
    make = nn.remat(block, static_argnums=(2,)) if self.remat else block  # 2: train
    self.stem = Stem()
    blocks = []
    in_features = 64
    for s, count in enumerate(self.stage_sizes):
      features = 64 * 2 ** s
      for b in range(count):
        strides = 2 if (s > 0 and b == 0) else 1
        downsample = b == 0 and (strides != 1 or in_features != features * block.expansion)
        blocks.append(make(features, strides, downsample, name=f"layer{s + 1}_{b}"))
        in_features = features * block.expansion
    self.blocks = blocks
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Global-average-pooled last-stage features, float32 [B, C]."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    return self.head(f).astype(jnp.float32) if self.num_classes else f


STAGES = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False),
          50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True),
          152: ((3, 8, 36, 3), True)}


def resnet(depth: int, num_classes: int = 1000, *, remat: bool = False) -> ResNet:
  """Builds ResNet-`depth` (18, 34, 50, 101 or 152); `remat`: `ResNet.remat`.

  >>> resnet(50, 10).bottleneck
  True
  """
  if depth not in STAGES:
    raise ConfigError(f"Unknown ResNet depth {depth!r}; expected one of {sorted(STAGES)}.")
  stage_sizes, bottleneck = STAGES[depth]
  return ResNet(num_classes=num_classes, stage_sizes=stage_sizes, bottleneck=bottleneck,
                remat=remat)


# torchvision names -> ours (module path, and leaf).
_MODULE_RULES = [
    (r"conv1", "stem/conv"), (r"bn1", "stem/bn"), (r"fc", "head"),
    (r"layer(\d+)\.(\d+)\.downsample\.0", r"layer\1_\2/downsample/conv"),
    (r"layer(\d+)\.(\d+)\.downsample\.1", r"layer\1_\2/downsample/bn"),
    (r"layer(\d+)\.(\d+)\.(conv\d|bn\d)", r"layer\1_\2/\3"),
]


def torch_conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch conv weight OIHW -> flax kernel HWIO."""
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def convert_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a torchvision ResNet state dict to flat "params/..." and "batch_stats/..." paths.

  Conv weights go OIHW -> HWIO, the fc weight (out, in) -> (in, out), BatchNorm
  running_mean/var -> batch_stats mean/var; num_batches_tracked is dropped.
  Unknown keys pass through unchanged so that a strict load reports them.

  >>> sd = {"layer1.0.bn1.running_var": np.ones(64, np.float32),
  ...       "layer1.0.bn1.num_batches_tracked": np.array(0)}
  >>> list(convert_torch(sd))
  ['batch_stats/layer1_0/bn1/var']
  """
  return convert_with_rules(state_dict, _MODULE_RULES)


example_input = registry.image_input


def groups(stage_sizes: Sequence[int]) -> list[tuple[str, str]]:
  """Layer groups bottom to top: stem, one per block, head."""
  blocks = [(f"layer{s + 1}_{b}", rf"layer{s + 1}_{b}/.*")
            for s, n in enumerate(stage_sizes) for b in range(n)]
  return [("stem", r"stem/.*")] + blocks + [("head", r"head/.*")]


for _depth in (18, 50):
  registry.register(registry.ModelSpec(
      name=f"resnet{_depth}",
      build=functools.partial(lambda d, num_classes=1000, remat=False: resnet(
          d, num_classes, remat=remat), _depth),
      **registry.image_inputs(NORMALIZATION),
      groups=groups(STAGES[_depth][0]),
      pretrained=f"resnet{_depth}/imagenet",
      converter=convert_torch,
))
