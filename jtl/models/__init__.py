"""The model zoo: `create(name, num_classes=..., pretrained=...)` and the families."""

from __future__ import annotations

# The submodules other code reaches as `models.<name>` are bound here by name:
# a package module executed again (pytest's importlib mode collecting a
# submodule's doctests) does not get the attributes of submodules that are
# already in sys.modules otherwise.
from jtl.models import (
  bert,
  conversion,
  creation,
  dinov2,
  efficientnet,
  layers,
  mobilenet,
  preprocessing,
  registry,
  speech,
  resnet,
  small_cnn,
  text,
  vgg,
  vit,
)
from jtl.models.creation import CreatedModel, create
from jtl.models.registry import (
  ModelSpec,
  get_spec,
  image_inputs,
  list_models,
  register,
  spec_of_module,
)
