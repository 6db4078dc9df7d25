"""Strategies on zoo architectures: EfficientNet-Lite0 (shapes only) and a small BERT."""

from __future__ import annotations

import re

import jax
import numpy as np
from strategies_helpers import changed

import jtl
import jtl.models
from jtl.models import bert, efficientnet, registry
from jtl.recipes import strategies


def lite0_shapes():
  spec = registry.get_spec("efficientnet_lite0")
  module = spec.build(num_classes=10)
  variables = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  return spec, module, dict(variables)


def test_efficientnet_lite0_partitions():
  spec, module, variables = lite0_shapes()
  flat = jtl.tree.flatten(variables["params"])
  size = {p: int(np.prod(v.shape)) for p, v in flat.items()}
  head = size["head/kernel"] + size["head/bias"]

  probe = strategies.build("linear_probe", module, variables, spec, verbose=False)
  assert probe.summary().trainable_params == head == 1280 * 10 + 10
  partial = strategies.build({"name": "partial", "num_blocks": 2}, module, variables, spec,
                             verbose=False)
  # BatchNorm trains (the default, with precise statistics) in the unfrozen blocks.
  assert partial.summary().trainable_params == head + sum(
      n for p, n in size.items() if p.startswith(("top/", "blocks_15/")))
  frozen_bn = strategies.build({"name": "partial", "num_blocks": 2, "freeze_batchnorm": True},
                               module, variables, spec, verbose=False)
  assert frozen_bn.summary().trainable_params == head + sum(
      n for p, n in size.items() if p.startswith(("top/", "blocks_15/"))
      and not re.search(r"_?bn/(scale|bias)$", p))
  bitfit = strategies.build("bitfit", module, variables, spec, verbose=False)
  assert bitfit.summary().trainable_params == head + sum(
      n for p, n in size.items() if re.search(r"_?bn/(scale|bias)$", p))

  layers = strategies.adaptable_layers(module, variables, np.zeros((1, 32, 32, 3), np.float32))
  assert "blocks_1/expand_conv" in layers and "stem/conv" in layers and "head" in layers
  assert not any(p.endswith("/dw") for p in layers)  # depthwise: no low-rank form
  lora = strategies.build({"name": "lora", "rank": 4}, module, variables, spec, verbose=False)
  adapters = {p: v for p, v in jtl.tree.flatten(lora.variables["params"]).items() if "lora_" in p}
  assert len(adapters) == 2 * (len(layers) - 1)
  assert adapters["blocks_1/expand_conv/lora_a"].shape == (16, 4)
  assert adapters["blocks_1/expand_conv/lora_b"].shape == (4, 96)
  assert adapters["stem/conv/lora_a"].shape == (27, 4)
  assert lora.summary().trainable_params == head + sum(np.size(v) for v in adapters.values())


def test_small_bert_lora_on_attention_step_and_merge():
  config = bert.BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                           intermediate_size=32, max_position=16, dropout=0.0,
                           attention_dropout=0.0)
  spec = registry.get_spec("minilm_l6")
  module = spec.build(num_classes=2, config=config)
  rng = np.random.default_rng(0)
  inputs = {"input_ids": rng.integers(0, 64, (8, 6)).astype(np.int32),
            "attention_mask": np.ones((8, 6), np.int32)}
  variables = jax.tree.map(np.asarray, dict(module.init(jax.random.PRNGKey(0), inputs)))
  small_spec = registry.ModelSpec(name="bert_small", build=spec.build,
                                  example_input=lambda b: {k: v[:b] for k, v in inputs.items()},
                                  groups=bert.groups(2))
  s = strategies.build({"name": "lora", "rank": 2, "alpha": 2.0,
                        "targets": [r"layer_\d/attention/(query|value)"]},
                       module, variables, small_spec, verbose=False)
  tx = s.make_optimizer(learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(s.variables, s.labels, tx)
  step = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  b = {"inputs": inputs, "label": rng.integers(0, 2, 8).astype(np.int32)}
  for _ in range(2):
    state, _ = step(state, b)
  expected = {f"layer_{i}/attention/{m}/lora_{x}" for i in range(2) for m in ("query", "value")
              for x in "ab"} | {"head/kernel", "head/bias"}
  assert changed(s.variables["params"], state.params) == expected
  merged = s.export_params(state.params)
  np.testing.assert_allclose(module.apply({"params": merged}, inputs),
                             s.module.apply(state.variables, inputs), rtol=1e-5, atol=1e-5)
