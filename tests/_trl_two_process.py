"""Rank script of test_integration_trl.py's two-process test (run by torchrun, not collected).

One group of 4 completions per step, split 2 + 2 across two CPU processes (gloo); each rank
saves its advantages, masks, independent log-probs and rewards to $LENS_OUT/rank{R}.pt.
"""
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import test_integration_trl as t  # noqa: E402

reward = t.RecordingReward()
trainer = t.train(t.RecordingLensTrainer, os.environ["LENS_OUT"], reward, per_device_train_batch_size=2)
records = [{"advantages": r["out"]["advantages"], "mask": r["out"]["completion_mask"], "logps": r["logps"]}
           for r in trainer.records]
torch.save({"records": records, "rewards": reward.calls},
           os.path.join(os.environ["LENS_OUT"], f"rank{trainer.accelerator.process_index}.pt"))
