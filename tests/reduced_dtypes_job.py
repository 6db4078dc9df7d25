"""What XLA's SPMD partitioner all-reduces in jtl's 8-device data-parallel
train step under bf16 compute: prints {model: {dtype: elements all-reduced,
"kernels": elements of its kernels, "others": of its other params}} as JSON.

Run by tests/models/test_wgrad.py in a process of its own: XLA reads the dump
flags once, when its backend starts. Usage: reduced_dtypes_job.py DUMP_DIR
"""

import json
import os
import re
import sys
from pathlib import Path

DUMP = Path(sys.argv[1])
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    f"--xla_dump_to={DUMP}", "--xla_dump_hlo_pass_re=spmd-partitioning"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import jtl  # noqa: E402
from jtl.models import resnet, vit  # noqa: E402
from models_for_tests import MLP  # noqa: E402

MODELS = {
    "vit": (vit.ViT(num_classes=4, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4,
                    image_size=16), 16),
    "resnet": (resnet.ResNet(num_classes=4, stage_sizes=(1, 1), bottleneck=True), 16),
    "plain_flax": (MLP(), 8),
}


def reduced(module, size: int) -> dict[str, int]:
  before = set(DUMP.glob("*")) if DUMP.exists() else set()
  x = np.zeros((16, size, size, 3), np.float32)
  variables = module.init(jax.random.key(0), x[:2], train=False)
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-3)
  mesh = jtl.make_mesh()
  state = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh)
  step = jtl.jit_train_step(
      jtl.make_train_step(module, tx, labels=labels, compute_dtype=jnp.bfloat16), mesh)
  batch = jtl.shard_batch({"inputs": x, "label": np.zeros(16, np.int32)}, mesh)
  step.lower(state, batch).compile()
  found: dict[str, int] = {}
  for path in set(DUMP.glob("*after_spmd-partitioning*")) - before:
    for line in path.read_text().splitlines():
      m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) all-reduce(?:-start)?\(", line)
      for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1) if m else ""):
        if dims:  # arrays; the loss's scalars are not gradients
          found[dtype] = found.get(dtype, 0) + int(np.prod([int(d) for d in dims.split(",")]))
  kernels = sum(np.size(v) for path, v in jtl.tree.leaves_with_paths(variables["params"])
                if path.endswith("kernel"))
  others = sum(np.size(v) for v in jax.tree.leaves(variables["params"])) - kernels
  return {**found, "kernels": int(kernels), "others": int(others)}


print(json.dumps({name: reduced(*spec) for name, spec in MODELS.items()}))
