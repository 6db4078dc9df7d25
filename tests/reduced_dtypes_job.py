"""What XLA's SPMD partitioner all-reduces in jtl's 8-device data-parallel
train step under bf16 compute: prints {model: {dtype: elements all-reduced,
"weights": elements of the trained kernels, embedding tables looked up by id
and LoRA adapters, "others": of the other trained params}} as JSON.

Run by tests/models/test_wgrad.py in a process of its own: XLA reads the dump
flags once, when its backend starts. Usage: reduced_dtypes_job.py DUMP_DIR
"""

import json
import os
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # before jax is imported: XLA reads its flags once
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
      f"--xla_dump_to={sys.argv[1]}", "--xla_dump_hlo_pass_re=spmd-partitioning"])
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import jtl  # noqa: E402
from jtl.models import bert, resnet, vit  # noqa: E402
from jtl.recipes import strategies  # noqa: E402
from models_for_tests import MLP  # noqa: E402

def images(size: int) -> np.ndarray:
  return np.zeros((16, size, size, 3), np.float32)


TOKENS = {"input_ids": np.arange(16 * 8, dtype=np.int32).reshape(16, 8) % 50,
          "attention_mask": np.ones((16, 8), np.int32)}
MODELS = {
    "vit": (vit.ViT(num_classes=4, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4,
                    image_size=16), images(16)),
    "resnet": (resnet.ResNet(num_classes=4, stage_sizes=(1, 1), bottleneck=True), images(16)),
    "bert": (bert.Bert(num_classes=4, config=bert.BertConfig(
        vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
        max_position=8)), TOKENS),
    "vit_lora": (vit.ViT(num_classes=4, width=16, depth=1, mlp_dim=32, num_heads=2,
                         patch_size=4, image_size=16), images(16)),
    "plain_flax": (MLP(), images(8)),
}
LORA = "vit_lora"  # adapters on the attention's projections; they and the head train


def reduced(dump: Path, name: str, module, x) -> dict[str, int]:
  before = set(dump.glob("*")) if dump.exists() else set()
  variables = module.init(jax.random.key(0), jax.tree.map(lambda a: a[:2], x), train=False)
  rules = [(".*", "all")]
  if name == LORA:
    layers = strategies.adaptable_layers(module, variables, x[:2])
    variables = strategies.add_lora(module, variables, x[:2], rank=2,
                                    targets=strategies.default_targets(layers))
    module, rules = strategies.LoraModel(module, alpha=4.0), strategies.lora_rules()
  labels = jtl.label_params(variables["params"], rules)
  tx = jtl.make_optimizer(labels, learning_rate=1e-3)
  mesh = jtl.make_mesh()
  state = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh)
  step = jtl.jit_train_step(
      jtl.make_train_step(module, tx, labels=labels, compute_dtype=jnp.bfloat16), mesh)
  batch = jtl.shard_batch({"inputs": x, "label": np.zeros(16, np.int32)}, mesh)
  step.lower(state, batch).compile()
  found: dict[str, int] = {}
  for path in set(dump.glob("*after_spmd-partitioning*")) - before:
    for line in path.read_text().splitlines():
      m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) all-reduce(?:-start)?\(", line)
      for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1) if m else ""):
        if dims:  # arrays; the loss's scalars are not gradients
          found[dtype] = found.get(dtype, 0) + int(np.prod([int(d) for d in dims.split(",")]))
  names = jtl.tree.flatten(labels)
  trained = {p: np.size(v) for p, v in jtl.tree.flatten(variables["params"]).items()
             if names[p] != jtl.partition.FROZEN}
  # Kernels, the tables looked up by the batch's ids and LoRA adapters; BERT's
  # position table is looked up once for the whole batch and reduced over it,
  # like a bias.
  weights = sum(n for p, n in trained.items() if "lora" in p or p.endswith(
      ("/kernel", "word_embeddings/embedding", "token_type_embeddings/embedding")))
  others = sum(trained.values()) - weights
  return {**found, "weights": int(weights), "others": int(others)}


if __name__ == "__main__":
  dump = Path(sys.argv[1])
  print(json.dumps({name: reduced(dump, name, *spec) for name, spec in MODELS.items()}))
