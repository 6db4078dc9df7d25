"""The timm side of benchmark_accelerator.py (run by it in a Python with torch + timm).

  python scripts/benchmarks/benchmark_accelerator_torch.py \\
      --plan vit_base_patch16_224:vit_b16:full:256,resnet50:resnet50:frozen:256 \\
      --image_size 224 --steps 20 --budget_s 150

What a PyTorch user would pick: timm models, AdamW, AMP bf16 autocast,
`torch.compile` where it works (else eager, noted in the row), channels_last
for convnets. Modes, as jtl's: "full" trains everything; "frozen" only the
classifier (`requires_grad=False` elsewhere, the backbone in eval mode:
stored BatchNorm statistics, as jtl's frozen partition); "partial" the last 2
blocks and what follows them; "forward" the bf16 eval-mode forward alone
(`torch.inference_mode`). Per row: images/s, compile + warm-up seconds, the
peak CUDA memory. Prints one JSON object per line, in the plan's order, and
starts no new row once --budget_s has passed; jtl itself never imports this.
"""

import argparse
import json
import sys
import time

import timm
import torch


def last_blocks(model, name: str) -> list:
  """The modules trained in "partial": the last 2 blocks and those after them
  (as jtl's partition of the same model)."""
  if "vit" in name:
    return list(model.blocks)[-2:] + [model.norm, model.fc_norm, model.head]
  if "resnet" in name:
    return [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
            for b in layer][-2:] + [model.fc]
  return ([b for stage in model.blocks for b in stage][-2:]
          + [model.conv_head, model.bn2, model.classifier])


def _prepare(model, name: str, mode: str) -> list:
  """requires_grad and train/eval per mode; returns the trained parameters."""
  trained = {"full": [model], "frozen": [model.get_classifier()],
             "partial": last_blocks(model, name), "forward": []}[mode]
  for p in model.parameters():
    p.requires_grad_(mode == "full")
  model.train(mode == "full")
  for module in trained:
    module.train()
    for p in module.parameters():
      p.requires_grad_(True)
  return [p for p in model.parameters() if p.requires_grad]


def measure(zoo: str, name: str, mode: str, batch: int, size: int, steps: int,
            row_budget_s: float) -> dict:
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # A fresh compile per row: dynamo's cache is per class, and a second batch
  # size would otherwise be compiled with a dynamic batch dimension.
  torch._dynamo.reset()
  if device == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  model = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
  convnet = "vit" not in name
  if convnet:
    model = model.to(memory_format=torch.channels_last)
  params = _prepare(model, name, mode)
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05) if params else None
  x = torch.randn(batch, 3, size, size, device=device)
  if convnet:
    x = x.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, 1000, (batch,), device=device)
  compiled, t0 = "compiled", time.perf_counter()
  try:
    fwd = torch.compile(model)
  except Exception:  # noqa: BLE001
    fwd, compiled = model, "eager"

  def step():
    if opt is None:
      with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        fwd(x)
      return
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(fwd(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  try:
    for _ in range(3):
      step()
  except Exception:  # noqa: BLE001 - torch.compile failures surface at the first call
    fwd, compiled = model, "eager"
    for _ in range(3):
      step()
  sync()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  step()
  sync()
  steps = max(1, min(steps, int(row_budget_s / max(time.perf_counter() - t0, 1e-6))))
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  seconds = (time.perf_counter() - t0) / steps
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
  return {"framework": "timm", "model": zoo, "timm_name": name, "mode": mode, "batch": batch,
          "image_size": size, "images_per_s": batch / seconds, "step_ms": 1e3 * seconds,
          "steps": steps, "torch": torch.__version__, "how": compiled,
          "peak_memory_gib": peak, "warmup_s": warmup_s}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--plan", required=True, help="timm_name:zoo_name:mode:batch,...")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--budget_s", type=float, default=150)
  parser.add_argument("--row_budget_s", type=float, default=15)
  args = parser.parse_args()
  start = time.perf_counter()
  for item in args.plan.split(","):
    name, zoo, mode, batch = item.split(":")
    if time.perf_counter() - start > args.budget_s:
      print(f"timm {name} {mode} {batch}: not measured (time budget)", file=sys.stderr)
      continue
    try:
      row = measure(zoo, name, mode, int(batch), args.image_size, args.steps,
                    args.row_budget_s)
    except Exception as e:  # noqa: BLE001 - out of memory or a model timm lacks
      print(f"timm {name} {mode} {batch}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
      continue
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
