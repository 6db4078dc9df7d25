"""The accelerator programs, proved without an accelerator (issue 28).

Each train step is traced from shapes alone (`jax.eval_shape`: no weights
allocated) and lowered for TPU or CUDA on this CPU host
(`.lower(lowering_platforms=...)`: StableHLO, not compiled). What is checked
is the program as the accelerator receives it, before XLA's own passes:

- every zoo family's full fine-tuning step lowers for TPU (the smallest
  variant of each: the same code as its larger siblings);
- a frozen-backbone step contains the forward pass and the head's gradient,
  and no backward pass of the frozen blocks: its convolutions and matmuls
  are those of the forward plus the head's one weight-gradient matmul, where
  the full step has about three times the forward's;
- ViT-B/16 with `fused_attention=True`, lowered for CUDA, calls cuDNN's fused
  attention (forward and backward custom calls, [B, T, heads, head_dim]
  operands) and no [B, heads, 197, 197] score tensor is left in the program.
  jax only traces that path where cuDNN is installed, so that test runs in a
  subprocess with the CUDA jaxlib plugin and cuDNN wheels from
  `make cuda-lowering` (a folder outside the venv: the rest of the suite
  never sees them); without them it is skipped, and the next test checks
  what the same model lowers to without cuDNN (Flax's attention).

With the same wheels, steps are also compiled for an H100 that is only
described (scripts/benchmarks/deviceless.py: XLA's GPU compiler, ptxas and
cuDNN run on this host): the frozen step after XLA's passes, and cuDNN's
attention in the compiled program; with libtpu (`make tpu-compiler`), for
TPU v5e chips (one, and four in data parallel). How deviceless.py reads a
compiled module is tested without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtl
from jtl.models import registry

ROOT = Path(__file__).parents[2]
CUDA_SITE = Path(os.environ.get("JTL_CUDA_LOWERING_SITE",
                                Path.home() / ".cache" / "jtl" / "cuda-lowering"))
# One model per family, the smallest; depthwise convs as the accelerator
# traces them ("auto" picks the CPU's shifted form on this host).
FAMILIES = {
    "vit_ti16": {}, "dinov2_s14": {}, "efficientnet_lite0": {"formulation": "grouped"},
    "mobilenet_v2": {"formulation": "grouped"}, "resnet18": {}, "small_cnn": {},
    "vgg16": {}, "minilm_l6": {},
}


def _rules(mode: str) -> list[tuple[str, str]]:
  return [(".*", "all")] if mode == "full" else [("head/.*", "head"), (".*", "frozen")]


def abstract_step(name: str, mode: str, *, batch: int = 2, **build):
  """(module, variables, state, step, batch) of a zoo model as shapes only:
  bf16 compute, AdamW, the spec's own example input at `batch`."""
  spec = registry.get_spec(name)
  module = spec.build(num_classes=10, **build)
  variables = registry.abstract_variables(spec, module)
  labels = jtl.label_params(variables["params"], _rules(mode))
  tx = jtl.make_optimizer(labels, learning_rate=1e-3, weight_decay=0.05)
  state = jax.eval_shape(lambda v: jtl.create_train_state(v, labels, tx), variables)
  step = jtl.make_train_step(module, tx, labels=labels, compute_dtype=jnp.bfloat16)
  shape = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
  data = {"inputs": jax.tree.map(shape, spec.example_input(batch)),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return module, variables, state, step, data


def heavy_ops(text: str) -> tuple[int, int]:
  """(convolutions, dot_generals) in a StableHLO module's text."""
  return (len(re.findall(r"stablehlo\.convolution\b", text)),
          len(re.findall(r"stablehlo\.dot_general\b", text)))


def lower_forward(module, variables, inputs, platform: str) -> str:
  """StableHLO of the bf16 eval-mode forward pass, lowered for `platform`."""
  bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), variables)
  to_bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
  forward = jax.jit(lambda v, x: module.apply(v, jax.tree.map(to_bf16, x), train=False))
  return forward.trace(bf16, inputs).lower(lowering_platforms=(platform,)).as_text()


# DINOv2 is ViT's code with registers and layer scale, MobileNetV2 the
# inverted residuals of EfficientNet-Lite: their lowering (~5 s of CPU each)
# runs in make test-all; ViT and Lite0 stand for them in the default run.
SLOW_FAMILIES = ("dinov2_s14", "mobilenet_v2")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in FAMILIES])
def test_full_step_lowers_for_tpu_and_frozen_step_has_no_backbone_backward(name):
  build = FAMILIES[name]
  module, variables, state, step, data = abstract_step(name, "full", **build)
  full = heavy_ops(jax.jit(step).trace(state, data).lower(lowering_platforms=("tpu",)).as_text())
  _, _, state, step, data = abstract_step(name, "frozen", **build)
  frozen = heavy_ops(
      jax.jit(step).trace(state, data).lower(lowering_platforms=("tpu",)).as_text())
  forward = heavy_ops(lower_forward(module, variables, data["inputs"], "tpu"))
  assert sum(forward) > 0
  # Frozen: the forward, plus one matmul (the head's weight gradient).
  assert frozen == (forward[0], forward[1] + 1), (frozen, forward)
  # Full fine-tuning: the backward (input and weight gradients) is there, so
  # the count can tell: about 3x the forward's heavy ops.
  assert sum(full) >= 2.5 * sum(forward), (full, forward)


CUDA_PROGRAM = """
import json, re, sys
import jax
sys.path.insert(0, sys.argv[1])
from test_accelerator_programs import abstract_step
out = {}
for fused in (True, False):
  _, _, state, step, data = abstract_step("vit_b16", "full", fused_attention=fused)
  text = jax.jit(step).trace(state, data).lower(lowering_platforms=("cuda",)).as_text()
  calls = [re.search(r'custom_call @(\\S+?)\\(.*\\} : \\((.*?)\\) ->', line).groups()
           for line in text.splitlines() if "stablehlo.custom_call @" in line]
  out[str(fused)] = {
      "targets": sorted({target for target, _ in calls}),
      "operands": sorted({types for target, types in calls if "fmha" in target}),
      "scores": len(re.findall(r"tensor<2x12x19[78]x19[78]x", text)),
  }
print("RESULT " + json.dumps(out))
"""


def test_vit_b16_fused_attention_lowers_to_cudnn_flash_attention():
  if not (CUDA_SITE / "jax_cuda12_plugin").is_dir():
    pytest.skip(f"no CUDA lowering wheels in {CUDA_SITE} (`make cuda-lowering` installs them)")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(CUDA_SITE), str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", CUDA_PROGRAM, str(Path(__file__).parent)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.split("RESULT ", 1)[1])
  fused, plain = out["True"], out["False"]
  # cuDNN's flash attention, forward and backward, on [B, T, heads, head_dim]
  # operands: 197 tokens padded to 198 (jax's cuDNN training path wants an
  # even length), the padding masked by sequence lengths.
  assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(fused["targets"])
  assert all("tensor<2x198x12x64xbf16>" in o for o in fused["operands"]), fused["operands"]
  # No [B, heads, T, T] scores anywhere; Flax's attention writes them.
  assert fused["scores"] == 0
  assert plain["scores"] > 0 and not any("fmha" in t for t in plain["targets"])


def test_fused_attention_without_cudnn_is_flax_attention():
  """On a host without cuDNN (this venv has no CUDA plugin), the fused option
  lowers for CUDA to the same program as Flax's attention: the documented
  fallback, never an error."""
  from jax._src.lib import cuda_versions
  if cuda_versions is not None:
    pytest.skip("cuDNN is installed in this Python")
  texts = []
  for fused in (True, False):
    module, variables, _, _, data = abstract_step("vit_ti16", "frozen", fused_attention=fused)
    text = lower_forward(module, variables, data["inputs"], "cuda")
    texts.append(re.sub(r"loc\(.*?\)|#loc\d*", "", text))
  assert texts[0] == texts[1] and heavy_ops(texts[0]) == (1, 97)
  # For CUDA, XLA's attention runs over 200 tokens (197 padded, masked):
  # cuBLAS's aligned operands, `vit.xla_attention`.
  assert "fmha" not in texts[0] and re.search(r"tensor<2x3x200x200x", texts[0])


# --- Compiled for a GPU that is only described (scripts/benchmarks/deviceless.py) ---

BENCHMARKS = ROOT / "scripts" / "benchmarks"

COMPILED_HLO = """\
HloModule jit_step, is_scheduled=true

%fused_scale (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %m = f32[8,4]{1,0} multiply(%p, %p)
}

%body (arg: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %arg = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%arg), index=1
  %gemm = (f32[8,4]{1,0}, s8[16]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul"
  %y = f32[8,4]{1,0} get-tuple-element(%gemm), index=0
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %y)
}

ENTRY %main (a: f32[8,4]) -> f32[2,3,60,60] {
  %a = f32[8,4]{1,0} parameter(0)
  %loop_multiply_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_scale
  %input_reduce_fusion = f32[8]{0} fusion(%loop_multiply_fusion), kind=kInput, calls=%fused_scale
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %copy.1 = f32[4,8]{0,1} copy(%a)
  %ars = f32[8,4]{1,0} all-reduce-start(%loop_multiply_fusion), channel_id=1, to_apply=%sum
  %ard = f32[8,4]{1,0} all-reduce-done(%ars)
  %conv = (bf16[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$convForward"
  ROOT %scores = f32[2,3,60,60]{3,2,1,0} fusion(%a), kind=kLoop, calls=%fused_scale
}
"""


def test_compiled_kernels_are_counted_by_kind_with_the_bytes_they_move():
  """deviceless.py's reading of a compiled module: launches per kind (a loop body
  once per known trip, an async collective once), bytes = operands + result,
  attention-score buffers."""
  sys.path.insert(0, str(BENCHMARKS))
  import deviceless
  found = deviceless.kernels(COMPILED_HLO)
  assert [k["kind"] for k in found] == [
      "elementwise", "reduction", "gemm", "gemm", "gemm", "layout", "collective", "conv",
      "elementwise"]
  assert [k["bytes"] for k in found][:3] == [128 + 128, 32 + 128, 128 + 16 + 2 * 128]
  assert found[6]["bytes"] == 128  # a collective: the data it sends
  summary = deviceless.summarize(COMPILED_HLO, batch=2)
  assert (summary["kernels"], summary["n_gemm"], summary["n_layout"]) == (9, 3, 1)
  assert summary["score_buffers"] == 1
  assert deviceless.summarize(COMPILED_HLO, batch=8)["score_buffers"] == 0


def run_deviceless(program: str, site_variable: str, site: Path) -> dict:
  """What `program` prints after "RESULT " (JSON), run in a fresh Python
  that finds deviceless.py and the compiler in `site` (named by
  `site_variable`): the compilers load before jax, outside this process."""
  env = {**os.environ, site_variable: str(site),
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run([sys.executable, "-c", program, str(BENCHMARKS)],
                        capture_output=True, text=True, env=env, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.split("RESULT ", 1)[1])


AOT_PROGRAM = """
import json, sys
sys.path.insert(0, sys.argv[1])
import deviceless
deviceless.setup()
from pathlib import Path
devices = deviceless.target_devices("cuda", str(Path(sys.argv[1]) / "gpu_targets" / "h100_sxm.txtpb"))
rows = {}
for mode, build in (("forward", {}), ("frozen", {}), ("full", {}),
                    ("full", {"fused_attention": True})):
  row = deviceless.compile_row(devices, "vit_ti16", mode, 4, 224, build)
  rows[mode + ("_fused" if build else "")] = row
two = deviceless.target_devices("cuda", str(Path(sys.argv[1]) / "gpu_targets" / "h100_sxm.txtpb"), 2)
rows["two_full"] = deviceless.compile_row(two, "vit_ti16", "full", 8, 224, {})
print("RESULT " + json.dumps(rows))
"""


def test_steps_compiled_for_an_h100_on_this_host():
  """ViT-Ti/16's programs compiled for an H100 by XLA's GPU compiler on this
  host (deviceless): after XLA's passes, the frozen step's library calls are
  the forward's plus the head's weight gradient, and the bytes it moves are
  the forward's plus its weights' cast; the fused step's attention is
  cuDNN's (forward and backward per layer), no score buffer is left and it
  needs less memory; over two GPUs, weight gradients are summed in float32."""
  if not (CUDA_SITE / "jax_plugins" / "xla_cuda12").is_dir():
    pytest.skip(f"no CUDA plugin in {CUDA_SITE} (`make cuda-lowering` installs it)")
  rows = run_deviceless(AOT_PROGRAM, "JTL_CUDA_LOWERING_SITE", CUDA_SITE)
  forward, frozen, full, fused = (rows[k] for k in ("forward", "frozen", "full", "full_fused"))
  assert frozen["n_gemm"] == forward["n_gemm"] + 1 and frozen["n_conv"] == forward["n_conv"]
  # Beyond the forward's bytes: the fp32 weights read and their bf16 copy
  # written each step (5.7 M parameters: 0.03 GiB; the forward row's weights
  # are bf16 already) and the head's gradient.
  assert frozen["gib_moved"] - forward["gib_moved"] <= 0.04
  assert full["n_gemm"] >= 2.5 * forward["n_gemm"]
  assert fused["n_attention"] == 24 and full["n_attention"] == 0
  assert fused["score_buffers"] == 0 < full["score_buffers"]
  assert fused["program_gib"] < full["program_gib"]
  # Two GPUs: the weight gradients are summed in float32 (jtl.models.wgrad;
  # 5.5 M of ViT-Ti's 5.7 M parameters are kernels), the rest in bf16.
  two = rows["two_full"]
  assert two["gib_reduced_f32"] >= 5.5e6 * 4 / 2**30 > 50 * two["gib_reduced_bf16"]


TPU_SITE = Path(os.environ.get("JTL_TPU_COMPILER_SITE",
                               Path.home() / ".cache" / "jtl" / "tpu-compiler"))
TPU_PROGRAM = """
import json, sys
sys.path.insert(0, sys.argv[1])
import deviceless
deviceless.setup("tpu")
one, four = (deviceless.target_devices("tpu", t) for t in ("v5e:1x1", "v5e:2x2"))
rows = {"one_full": deviceless.compile_row(one, "vit_ti16", "full", 2, None, {})}
for mode in ("frozen", "full"):
  rows["four_" + mode] = deviceless.compile_row(four, "vit_ti16", mode, 8, None, {})
print("RESULT " + json.dumps(rows))
"""


def test_steps_compile_for_tpu_v5e_on_this_host():
  """ViT-Ti/16's steps compiled by libtpu for TPU v5e chips on this host
  (deviceless: a topology name stands in for the chips; every family's step
  lowers for TPU above, compiling them all takes minutes): one chip's full
  step, and the data-parallel steps of four, where the frozen step sends the
  head's gradients only and the full step sums float32 weight gradients."""
  if not (TPU_SITE / "libtpu").is_dir():
    pytest.skip(f"no libtpu in {TPU_SITE} (`make tpu-compiler` installs it)")
  rows = run_deviceless(TPU_PROGRAM, "JTL_TPU_COMPILER_SITE", TPU_SITE)
  assert rows["one_full"]["program_gib"] > 0 and rows["one_full"]["gib_collective"] == 0
  frozen, full = rows["four_frozen"], rows["four_full"]
  # ViT-Ti/16: 5.7 M parameters, its head 193,000 (1000 classes): >= 2 bytes each.
  assert full["gib_collective"] >= 5.5e6 * 2 / 2**30
  # What the all-reduces read: the kernels' float32 gradients (jtl.models.wgrad).
  assert full["gib_reduced_f32"] >= 5.5e6 * 4 / 2**30 > 50 * full["gib_reduced_bf16"]
  assert 0 < frozen["gib_collective"] <= 193_000 * 4 / 2**30 + 1e-4
