"""The model zoo: `create(name, num_classes=..., pretrained=...)` and the families."""

from __future__ import annotations

from jtl.models import (
  bert,
  dinov2,
  efficientnet,
  mobilenet,
  speech,
  resnet,
  small_cnn,
  vgg,
  vit,
)
from jtl.models.registry import (
  CreatedModel,
  ModelSpec,
  create,
  get_spec,
  image_inputs,
  list_models,
  register,
  spec_of_module,
)
