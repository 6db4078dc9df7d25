"""`model="auto"` against each fixed backbone through configs/folder.py.

For each dataset and seed, the folder config (LP-FT) runs once with each
fixed EfficientNet-Lite backbone and once with `--config.model=auto` (the
cached probe of each candidate on the validation split picks the backbone;
jtl.recipes.selection). Each run is `experiment.finetune` then the test split
scored once (`evaluation.evaluate_test_split`), in this process, with the
persistent compilation cache on as scripts/finetune.py has it (the first run
of a backbone compiles, later seeds reuse its programs). Prints
test accuracy per backbone (mean and per seed), auto's choices, and wall
times, with auto's ratio to the Lite0 default; rows go to --out/results.jsonl
(a rerun skips the runs already there). `--models ...,select` runs auto's
selection alone: auto's run is the chosen backbone's run with the same seed
(identical test accuracy where both ran), so its row is derived from the two.

Datasets: the CIFAR-10 folder (--cifar_dir; the first --per_class training
images of each class, the first --test_per_class test images) and the sklearn
digits folder (make_small_folders.py's split: 1,297 train, 500 test; with
--digits_per_class N, the first N training images of each digit), both at
--image_size for every backbone, or each backbone's native size with
--image_size 0 (the folder config's default: Lite0 224, Lite1 240, Lite2 260
px; auto's candidates too).

  GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
  python scripts/benchmarks/benchmark_model_auto.py --cifar_dir /path/to/cifar10_subset \\
      --out /tmp/auto --per_class 50 --image_size 64 --num_epochs 2 --seeds 0,1,2
  python scripts/benchmarks/benchmark_model_auto.py --out /tmp/auto --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # common.py, make_small_folders.py
sys.path.insert(0, str(Path(__file__).parents[2]))  # configs/
from common import markdown_table  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def subset_folder(src: Path, dest: Path, per_class: int, test_per_class: int) -> Path:
  """dest/{train,test}/<class>/: links to the first files (sorted) of each class."""
  for split, n in (("train", per_class), ("test", test_per_class)):
    for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
      (dest / split / cls).mkdir(parents=True, exist_ok=True)
      for f in sorted((src / split / cls).iterdir())[:n]:
        link = dest / split / cls / f.name
        if not link.exists():
          link.symlink_to(f.resolve())
  return dest


def digits_folder(dest: Path) -> Path:
  import make_small_folders  # pylint: disable=g-import-not-at-top
  if not (dest / "train").exists():
    images, labels, names = make_small_folders.digits()
    make_small_folders.write_folder(dest, images, labels, names, test_per_class=50)
  return dest


def run(folder: Path, model: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
  """One folder-config run and its test score; the row of results.jsonl."""
  from configs import folder as folder_config  # pylint: disable=g-import-not-at-top
  from jtl.app import evaluation, experiment, model_choice  # pylint: disable=g-import-not-at-top
  c = folder_config.get_config()
  c.dataset, c.model, c.seed = f"folder:{folder}", model, seed
  c.image_size, c.num_epochs = args.image_size or None, args.num_epochs  # 0: native
  t0, cpu0 = time.perf_counter(), time.process_time()
  if model == "select":  # the selection alone; the run would be the chosen backbone's
    from etils import epath  # pylint: disable=g-import-not-at-top
    c.model = "auto"
    model_choice.choose(experiment.resolve_schedule(c), epath.Path(workdir))
    chosen = json.loads((workdir / model_choice.TABLE_JSON).read_text())
    return {"model": model, "seed": seed, "choice": chosen["choice"],
            "selection_seconds": chosen["seconds"], "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "candidates": chosen["candidates"]}
  experiment.finetune(c, workdir, progress=False)
  # CPU seconds too (all threads): on a shared machine the wall time follows the load.
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  test = evaluation.evaluate_test_split(c, workdir)
  row = {"model": model, "seed": seed, "test_accuracy": test["accuracy"],
         "test_count": test["count"], "wall_seconds": wall, "cpu_seconds": cpu}
  table = workdir / model_choice.TABLE_JSON
  if table.exists():
    chosen = json.loads(table.read_text())
    row.update(choice=chosen["choice"], selection_seconds=chosen["seconds"],
               candidates=chosen["candidates"])
  return row


def derived_auto(mine: list[dict]) -> list[dict]:
  """Auto rows for the seeds where only its selection ran ("select"): its run
  is the chosen backbone's run with the same seed (identical test accuracy,
  checked where both ran), so its test accuracy is that run's and its wall
  time that run's plus the selection's."""
  full = {r["seed"] for r in mine if r["model"] == "auto"}
  fixed = {(r["model"], r["seed"]): r for r in mine if r["model"] in BACKBONES}
  out = []
  for r in mine:
    run = fixed.get((r.get("choice"), r["seed"]))
    if r["model"] == "select" and r["seed"] not in full and run is not None:
      out.append({**r, "model": "auto", "derived": True, "test_accuracy": run["test_accuracy"],
                  "test_count": run["test_count"],
                  "wall_seconds": r["wall_seconds"] + run["wall_seconds"],
                  "cpu_seconds": r.get("cpu_seconds", 0) + run.get("cpu_seconds", 0)})
  return out


def report(rows: list[dict], dataset: str) -> None:
  """Test accuracy and wall time per backbone; auto's choices and time ratio."""
  mine = [r for r in rows if r["dataset"] == dataset and r["model"] != "select"]
  if not mine:
    return
  mine += derived_auto([r for r in rows if r["dataset"] == dataset])
  # Wall ratios on the seeds after the first: there the compilation cache is warm for
  # every run (in the first seed, the first run of each backbone compiles its programs).
  warm = sorted({r["seed"] for r in mine})[1:] or sorted({r["seed"] for r in mine})
  lite0 = {r["seed"]: r["wall_seconds"] for r in mine
           if r["model"] == BACKBONES[0] and r["seed"] in warm}
  lite0_cpu = {r["seed"]: r["cpu_seconds"] for r in mine
               if r["model"] == BACKBONES[0] and r["seed"] in warm and r.get("cpu_seconds")}
  out = []
  for model in (*BACKBONES, "auto"):
    rs = sorted((r for r in mine if r["model"] == model), key=lambda r: r["seed"])
    if not rs:
      continue
    acc = [100 * r["test_accuracy"] for r in rs]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    ratio = [r["wall_seconds"] / lite0[r["seed"]] for r in rs if r["seed"] in lite0]
    cpu_ratio = [r["cpu_seconds"] / lite0_cpu[r["seed"]] for r in rs
                 if r["seed"] in lite0_cpu and r.get("cpu_seconds")]
    chosen = ", ".join(r["choice"].replace("efficientnet_", "") for r in rs if r.get("choice"))
    out.append([model.replace("efficientnet_", ""), f"{statistics.mean(acc):.1f} ± {sd:.1f}",
                " / ".join(f"{a:.1f}" for a in acc), chosen or "-",
                f"{statistics.mean(r['wall_seconds'] for r in rs if r['seed'] in warm):.0f}",
                f"{statistics.mean(ratio):.2f}x" if ratio else "-",
                f"{statistics.mean(cpu_ratio):.2f}x" if cpu_ratio else "-"])
  print(f"\n{dataset} ({mine[0]['test_count']} test images), seeds "
        f"{sorted({r['seed'] for r in mine})}")
  print(markdown_table(["backbone", "test acc % (mean ± sd)", "per seed", "auto's choice",
                        f"wall s (seeds {warm})", "wall / lite0", "CPU s / lite0"], out))
  for r in mine:
    if r["model"] == "auto":
      print(f"  seed {r['seed']}{' (derived: selection + the chosen run)' * bool(r.get('derived'))}"
            f": selection {r['selection_seconds']:.0f}s; " + "; ".join(
          f"{c['name'].replace('efficientnet_', '')} val {c['val_accuracy']:.3f} "
          f"feat {c['feature_seconds']:.0f}s {c['ms_per_image']:.1f}ms/img"
          for c in r["candidates"] if c["val_accuracy"] is not None))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cifar_dir", type=Path, help="the CIFAR-10 image folder (train/, test/)")
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--datasets", default="cifar10,digits")
  p.add_argument("--per_class", type=int, default=50)
  p.add_argument("--test_per_class", type=int, default=100)
  p.add_argument("--digits_per_class", type=int, default=0,
                 help="the first N training images of each digit (0: all 1,297; test: all 500)")
  p.add_argument("--image_size", type=int, default=64,
                 help="pixels for every backbone; 0: each backbone's native size")
  p.add_argument("--num_epochs", type=int, default=2)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--models", default=",".join((*BACKBONES, "auto")),
                 help="backbones, 'auto' (a whole run) or 'select' (its selection alone)")
  p.add_argument("--report", action="store_true", help="print the tables of --out only")
  args = p.parse_args()
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jtl.app import cli, cpu  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  cpu.configure_cpu_runtime()
  cli.enable_compilation_cache()  # as scripts/finetune.py: seeds after the first reuse programs
  results = args.out / "results.jsonl"
  rows = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
  if args.report:
    for name in args.datasets.split(","):
      report(rows, name)
    return
  folders = {}
  for name in args.datasets.split(","):
    if name == "cifar10":
      if args.cifar_dir is None:
        raise SystemExit("--cifar_dir is required for cifar10")
      folders[name] = subset_folder(args.cifar_dir, args.out / "folders" / "cifar10",
                                    args.per_class, args.test_per_class)
    else:
      folders[name] = digits_folder(args.out / "folders" / "digits")
      if args.digits_per_class:
        folders[name] = subset_folder(folders[name], args.out / "folders" / "digits_subset",
                                      args.digits_per_class, 50)
  done = {(r["dataset"], r["model"], r["seed"]) for r in rows}
  for seed in (int(s) for s in args.seeds.split(",")):
    for name, folder in folders.items():
      for model in args.models.split(","):
        if (name, model, seed) in done:
          continue
        print(f"== {name} {model} seed {seed} ({time.strftime('%H:%M:%S')}, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        row = {"dataset": name, **run(folder, model, seed, args,
                                      args.out / "runs" / f"{name}_{model}_{seed}")}
        rows.append(row)
        with results.open("a") as f:
          f.write(json.dumps(row) + "\n")
  for name in folders:
    report(rows, name)


if __name__ == "__main__":
  main()
