"""Dependencies point down: core <- recipes <- app (ARCHITECTURE.md).

Parses every module of the package (module-level and function-level imports)
and fails on an import from a higher layer, and on TensorFlow or
ml_collections imported by the core outside the data pipeline. `KNOWN` lists
the upward imports that remain (app code that still lives in a lower module);
the test also fails when one of them is gone, so the list only shrinks.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "jtl"
APP = ("jtl.app",)  # the folders are the layers
RECIPES = ("jtl.recipes",)
TF_ALLOWED = ("jtl.data",)  # the input pipelines, loaded only when one is built
# Upward imports that remain: none (the LoRA leaf layout and merge that the
# exports need moved to the core, jtl.lora_layout). Keep it empty.
KNOWN: set[tuple[str, str]] = set()


def layer(module: str) -> int:
  if module.startswith(APP):
    return 2
  if module.startswith(RECIPES):
    return 1
  return 0


def modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), ast.parse(path.read_text())


def imported(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      if node.module.startswith("jtl"):  # from jtl.app import experiment
        names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def violations() -> set[tuple[str, str]]:
  found = set()
  for module, tree in modules():
    if module == "jtl":
      continue
    for name in imported(tree):
      if name.startswith("jtl.") and layer(name) > layer(module):
        found.add((module, name))
      third_party = name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "ml_collections")
      if third_party and layer(module) == 0 and not module.startswith(TF_ALLOWED):
        found.add((module, name.split(".")[0]))
  return found


def test_no_import_points_up():
  found = violations()
  new = sorted(found - KNOWN)
  assert not new, f"upward imports (core <- recipes <- app): {new}"
  gone = sorted(KNOWN - found)
  assert not gone, f"fixed, remove from KNOWN: {gone}"


def test_the_check_sees_an_upward_import(tmp_path):
  tree = ast.parse("def f():\n  from jtl.app import experiment\n")
  assert "jtl.app.experiment" in imported(tree) and layer("jtl.app.experiment") > layer("jtl.train")
