"""The model zoo: `create(name, num_classes=..., pretrained=...)` and the families."""

from __future__ import annotations

from jtl.models.registry import (CreatedModel, ModelSpec, create, get_spec,
                                 list_models, register)
from jtl.models import efficientnet, mobilenet
from jtl.models import bert, vit, resnet, vgg, small_cnn
from jtl.models import dinov2
