"""App: a config becomes a run, a run becomes numbers and files.

`experiment` (config -> data, model, strategy, method, `fit`; evaluation),
`preflight` (a config's problems found before any weights load; its data
checks in `preflight_data`),
`methods` (config -> a recipe's parts), `workdirs` (restore a finished run),
`deploy_runs` (a run to ONNX/LiteRT), `cli` (flags). Imports everything below;
the scripts are thin shells over it. It needs the "app" extra
(`pip install 'jtl[app]'`, which brings "data" and "hub" too): checked here,
by name, before any of it is imported.
"""

from jtl import _optional

_optional.check("jtl.app (scripts/finetune.py, evaluate.py, convert.py)", "ml_collections",
                "matplotlib", "tensorboardX", "tensorflow", "tensorflow_datasets",
                "tokenizers", "huggingface_hub")
