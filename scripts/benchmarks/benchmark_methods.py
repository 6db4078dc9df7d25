"""The config-selected methods end to end, through the real scripts: each row
is `scripts/finetune.py` with a config from configs/, then `scripts/evaluate.py`
on its workdir. Prints one table per method family.

  python scripts/benchmarks/benchmark_methods.py --workdir /tmp/bench_methods \
      --topics domain,distill,adversarial [--steps 400]

- domain: configs/domain.py:{source_only,coral,dann}, each evaluated on the
  target (jtl_digits test) as trained and after --adabn.
- distill: the default job (EfficientNet-Lite0, real ImageNet weights) is the
  teacher; SmallCNN-16 trained on labels alone vs distilled from it
  (configs/distill.py:labels vs configs/distill.py), same data and steps.
- adversarial: configs/adversarial.py:standard vs configs/adversarial.py;
  clean accuracy and accuracy under PGD-20 (eps 0.1 in pixel units), plus the
  standard model at int8 and bf16 (size, accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import print_table as table

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> float:
  """Runs a jtl script, returns its wall seconds; raises with its output on failure."""
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args],
                        capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-5000:]}")
  return time.perf_counter() - t


def finetune(config: str, workdir: Path, *overrides: str) -> float:
  if (workdir / "final_report.json").exists():
    return float("nan")  # finished earlier: reuse
  return run("finetune.py", "--config", str(ROOT / "configs" / config), "--workdir",
             str(workdir), *overrides)


def evaluate(workdir: Path, out: str, *flags: str) -> dict:
  out_dir = workdir / out
  run("evaluate.py", "--workdir", str(workdir), "--step", "latest", "--out_dir",
      str(out_dir), *flags)
  return json.loads(next(out_dir.glob("eval_*.json")).read_text())


def domain(root: Path, steps: list[str]) -> None:
  rows = []
  for name in ("source_only", "coral", "dann"):
    wd = root / f"domain_{name}"
    secs = finetune(f"domain.py:{name}", wd, *steps)
    plain = evaluate(wd, "eval_target")
    adabn = evaluate(wd, "eval_target_adabn", "--adabn")
    report = json.loads((wd / "final_report.json").read_text())
    rows.append([name, f"{plain['accuracy']:.4f}", f"{adabn['accuracy']:.4f}",
                 f"{report['eval']['accuracy']:.4f}", f"{secs:.0f}"])
  table("Domain adaptation: jtl_mnist5k (4,000 labelled) -> jtl_digits (997 unlabelled "
        "train images; accuracy on the 800 target test images), SmallCNN",
        ["config", "target acc", "target acc after --adabn", "final eval (target)",
         "train seconds"], rows)


def distill(root: Path, steps: list[str]) -> None:
  teacher = root / "teacher_default"
  t_secs = finetune("default.py", teacher)
  t_eval = evaluate(teacher, "eval", "--step", "best")
  rows = [["teacher: EfficientNet-Lite0, configs/default.py", f"{t_eval['accuracy']:.4f}",
           f"{t_secs:.0f}"]]
  for name, arg in (("student SmallCNN-16, labels only", "labels"),
                    ("student SmallCNN-16, distilled (T=4, alpha=0.9)", "")):
    wd = root / f"student_{arg or 'distill'}"
    teacher_flag = [] if arg else [f"--config.method.teacher_workdir={teacher}"]
    secs = finetune(f"distill.py{':' + arg if arg else ''}", wd, "--config.model=small_cnn_w16",
                    *teacher_flag, *steps)
    rows.append([name, f"{evaluate(wd, 'eval')['accuracy']:.4f}", f"{secs:.0f}"])
  table("Distillation on jtl_mnist5k (1,000 test digits)", ["model", "test acc", "train seconds"],
        rows)


def adversarial(root: Path, steps: list[str]) -> None:
  rows = []
  for name, arg in (("standard training", "standard"), ("PGD-7 adversarial training", "")):
    wd = root / f"adv_{arg or 'pgd'}"
    secs = finetune(f"adversarial.py{':' + arg if arg else ''}", wd, *steps)
    r = evaluate(wd, "eval_pgd", "--attack", "pgd", "--eps", "0.1", "--attack_steps", "20")
    rows.append([name, f"{r['accuracy']:.4f}", f"{r['adv_accuracy']:.4f}", f"{secs:.0f}"])
  table("Adversarial training on jtl_mnist5k, SmallCNN; PGD-20 at eps 0.1 (pixel units)",
        ["config", "clean acc", "PGD-20 acc", "train seconds"], rows)
  wd = root / "adv_standard"
  rows = []
  for precision in ("float32", "bfloat16", "int8"):
    r = evaluate(wd, f"eval_{precision}", "--precision", precision,
                 *(["--save_quantized", str(wd / "int8.safetensors")] if precision == "int8"
                   else []))
    size = r.get("saved_quantized", {}).get("bytes")
    rows.append([precision, f"{r['accuracy']:.4f}", f"{r['model_bytes'] / 1024:.0f}",
                 f"{size / 1024:.0f}" if size else "-"])
  table("Post-training precision of the standard SmallCNN (scripts/evaluate.py --precision)",
        ["precision", "test acc", "weights KiB (in memory)", "int8 file KiB"], rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/bench_methods")
  p.add_argument("--topics", default="domain,distill,adversarial")
  p.add_argument("--steps", type=int, default=0, help="override num_steps (0: the configs')")
  a = p.parse_args()
  root = Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  steps = [f"--config.num_steps={a.steps}"] if a.steps else []
  print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
  for topic in a.topics.split(","):
    t = time.perf_counter()
    {"domain": domain, "distill": distill, "adversarial": adversarial}[topic](root, steps)
    print(f"[{topic}: {time.perf_counter() - t:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
