"""scripts/finetune.py, unchanged, for the bucket workdir test (tests/app/test_gcs_workdir.py).

usage: python gcs_finetune_job.py FINETUNE_FLAGS...

With JTL_TEST_HOLD_AFTER_SAVE=N in the environment, the run stops after its
checkpoint at step N is complete and prints "holding at step N", then sleeps
while holding its workdir (lock included) until it is killed: a run killed
mid-run at a known point, without timing in the test.
"""

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def hold_after_save(step: int) -> None:
  from jtl.checkpoint import manager  # pylint: disable=g-import-not-at-top

  save = manager.CheckpointManager.save

  def save_then_hold(self, at, *args, **kwargs):
    saved = save(self, at, *args, **kwargs)
    if at >= step:
      self.wait()
      print(f"holding at step {at}", flush=True)
      time.sleep(300)
    return saved

  manager.CheckpointManager.save = save_then_hold


if __name__ == "__main__":
  if os.environ.get("JTL_TEST_HOLD_AFTER_SAVE"):
    hold_after_save(int(os.environ["JTL_TEST_HOLD_AFTER_SAVE"]))
  script = ROOT / "scripts" / "finetune.py"
  sys.argv = [str(script), *sys.argv[1:]]
  runpy.run_path(str(script), run_name="__main__")
