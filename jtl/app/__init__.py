"""App: a config becomes a run, a run becomes numbers and files.

`experiment` (config -> data, model, strategy, method, `fit`; evaluation),
`methods` (config -> a recipe's parts), `workdirs` (restore a finished run),
`deploy_runs` (a run to ONNX/LiteRT), `cli` (flags). Imports everything below;
the scripts are thin shells over it.
"""
