"""MobileNetV2 (Flax Linen) and its converter from the torchvision layout.

torchvision's MobileNetV2: ReLU6, BatchNorm eps 1e-5 / momentum 0.1 (flax
0.9), symmetric padding (k - 1) // 2, inputs normalised with the ImageNet
mean/std (`NORMALIZATION`, `preprocess`). No weights can be had offline here, so
`pretrained` names the torchvision source, which `jtl.weights.resolve`
fetches where there is a network.

Parameter paths: "stem/conv/kernel", "stem/bn/...", "blocks_{i}/expand_conv/
kernel" (not in blocks_0), "blocks_{i}/expand_bn/...", "blocks_{i}/dw/kernel"
(3, 3, 1, C), "blocks_{i}/dw_bn/...", "blocks_{i}/project_conv/kernel",
"blocks_{i}/project_bn/...", "top/conv/kernel", "top/bn/...", "head/kernel",
"head/bias"; blocks_i is torchvision's features.{i + 1}.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.models import preprocessing, registry, wgrad
from jtl.models.conversion import convert_with_rules
from jtl.models.layers import (
  BatchNorm,
  DepthwiseConv,
  conv_general_dilated,
  drop_path,
  relu6,
)

# (expand t, channels c, repeats n, stride s) per stage, as torchvision.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
IMAGENET_MEAN = np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(preprocessing.IMAGENET_STD, np.float32)
# torchvision's evaluation: resize 256, crop 224, ImageNet mean/std.
NORMALIZATION = preprocessing.model_normalization("imagenet")

_BatchNorm = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_init,
                          conv_general_dilated=conv_general_dilated)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's channel rounding (never more than 10% down)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def block_configs(width: float = 1.0) -> list[tuple[int, int, int, int]]:
  """(in, out, stride, expand) per inverted-residual block.

  >>> len(block_configs()), block_configs()[:2]
  (17, [(32, 16, 1, 1), (16, 24, 2, 6)])
  """
  cin, out = make_divisible(32 * width), []
  for t, c, n, s in V2_STAGES:
    cout = make_divisible(c * width)
    for r in range(n):
      out.append((cin, cout, s if r == 0 else 1, t))
      cin = cout
  return out


class InvertedResidual(nn.Module):
  """1x1 expand (if expand > 1), depthwise, 1x1 linear project (+ skip, with
  stochastic depth at `drop_rate`): MobileNetV2's block (3x3, padding 1,
  torchvision's BatchNorm) and EfficientNet-Lite's MBConv (its kernel, TF
  "SAME" padding, BatchNorm momentum 0.99 / eps 1e-3)."""
  cin: int
  cout: int
  stride: int
  expand: int
  formulation: str = "auto"
  kernel: int = 3
  padding: str | int = 1
  drop_rate: float = 0.0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    inputs = x
    bn = functools.partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon)
    if self.expand != 1:
      x = _Conv(self.cin * self.expand, (1, 1), name="expand_conv")(x)
      x = relu6(bn(name="expand_bn")(x, use_running_average=not train))
    x = DepthwiseConv(self.kernel, self.stride, self.padding, formulation=self.formulation,
                      kernel_init=_init, name="dw")(x)
    x = relu6(bn(name="dw_bn")(x, use_running_average=not train))
    x = _Conv(self.cout, (1, 1), name="project_conv")(x)
    x = bn(name="project_bn")(x, use_running_average=not train)
    if self.stride == 1 and self.cin == self.cout:
      rng = self.make_rng("dropout") if train and self.drop_rate > 0 else None
      x = drop_path(x, self.drop_rate, deterministic=not train, rng=rng) + inputs
    return x


class ConvBN(nn.Module):
  """Conv ("conv", symmetric padding) + BatchNorm ("bn") + ReLU6."""
  features: int
  kernel: int = 1
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    p = (self.kernel - 1) // 2
    x = _Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
              padding=((p, p), (p, p)), name="conv")(x)
    return relu6(_BatchNorm(name="bn")(x, use_running_average=not train))


class PooledConvNet(nn.Module):
  """stem -> blocks -> top -> mean pool [-> dropout -> head], float32 out:
  the `features` / `__call__` of MobileNetV2 and EfficientNet-Lite. A
  subclass's `setup` defines stem, blocks, top, dropout and, when
  `num_classes` is not 0, head."""

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled [N, C] features of the top conv (before dropout and head)."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    x = self.top(x, train=train)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.features(x, train=train)
    if not self.num_classes:
      return x.astype(jnp.float32)
    x = self.dropout(x, deterministic=not train)
    return self.head(x).astype(jnp.float32)


class MobileNetV2(PooledConvNet):
  """MobileNetV2 on float NHWC inputs normalised by `preprocess`.

  Attributes:
    num_classes: classes of the "head" Dense; 0 returns the pooled features.
    width: width multiplier (torchvision's `width_mult`).
    dropout_rate: dropout before the head.
    formulation: depthwise conv formulation ("auto", "shifted", "grouped").
  """
  num_classes: int = 1000
  width: float = 1.0
  dropout_rate: float = 0.2
  formulation: str = "auto"

  def setup(self) -> None:
    configs = block_configs(self.width)
    self.stem = ConvBN(configs[0][0], 3, 2)
    self.blocks = [InvertedResidual(cin, cout, s, t, self.formulation)
                   for cin, cout, s, t in configs]
    self.top = ConvBN(make_divisible(1280 * max(1.0, self.width)), 1, 1)
    self.dropout = nn.Dropout(self.dropout_rate)
    if self.num_classes:
      self.head = wgrad.Dense(
          self.num_classes, kernel_init=nn.initializers.normal(0.01))


def _block_path(m: re.Match) -> str:
  i, rest = int(m.group(1)), m.group(2)
  names = ({"0.0": "dw", "0.1": "dw_bn", "1": "project_conv", "2": "project_bn"}
           if i == 1 else
           {"0.0": "expand_conv", "0.1": "expand_bn", "1.0": "dw", "1.1": "dw_bn",
            "2": "project_conv", "3": "project_bn"})
  return f"blocks_{i - 1}/{names.get(rest, 'unknown_' + rest)}"


_MODULES = (
    (r"features\.0\.0", "stem/conv"), (r"features\.0\.1", "stem/bn"),
    (r"features\.18\.0", "top/conv"), (r"features\.18\.1", "top/bn"),
    (r"features\.(\d+)\.conv\.(\d(?:\.\d)?)", _block_path),
    (r"classifier\.1", "head"),
)


def convert_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a torchvision MobileNetV2 state dict to flat variable paths.

  >>> sd = {"features.2.conv.1.0.weight": np.zeros((96, 1, 3, 3)),
  ...       "classifier.1.weight": np.zeros((1000, 1280))}
  >>> {k: v.shape for k, v in convert_torch(sd).items()}
  {'params/blocks_1/dw/kernel': (3, 3, 1, 96), 'params/head/kernel': (1280, 1000)}
  """
  return convert_with_rules(state_dict, _MODULES)


# uint8 RGB images -> centre crop, resize, ImageNet mean/std normalisation:
# `preprocess(images, size=224, crop_fraction=0.875)`; size=None only normalises.
preprocess = NORMALIZATION.preprocessor()


example_input = registry.image_input


def mobilenet_v2(num_classes: int = 1000, **kwargs) -> MobileNetV2:
  """MobileNetV2 1.0 (3.5M parameters with the 1000-class head)."""
  return MobileNetV2(num_classes=num_classes, **kwargs)


registry.register(registry.ModelSpec(
    name="mobilenet_v2",
    build=mobilenet_v2,
    **registry.image_inputs(NORMALIZATION),
    groups=registry.block_groups(len(block_configs())), head_level=registry.BLOCK_HEAD_LEVEL,
    pretrained="mobilenet_v2/imagenet",
    converter=convert_torch,
))
