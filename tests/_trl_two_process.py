"""Rank script of test_integration_trl_loss.py's two-process test (run by torchrun, not collected).

One group of 4 completions per step, split 2 + 2 across two CPU processes (gloo); each rank
saves its advantages, masks, independent log-probs and rewards, and each loss step's TRL and
fused losses, gradients and metrics (``loss_type="dapo"``: the token count is global) to
$LENS_OUT/rank{R}.pt.
"""
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from tests import test_integration_trl as t  # noqa: E402
from tests import test_integration_trl_loss as tl  # noqa: E402


class Trainer(tl.DualLossTrainer, t.RecordingLensTrainer):
    pass


reward = t.RecordingReward()
trainer = t.train(Trainer, os.environ["LENS_OUT"], reward, per_device_train_batch_size=2, loss_type="dapo",
                  lens_fused_loss=True, **tl.FP32)
records = [{"advantages": r["out"]["advantages"], "mask": r["out"]["completion_mask"], "logps": r["logps"]}
           for r in trainer.records]
torch.save({"records": records, "rewards": reward.calls, "losses": trainer.loss_records},
           os.path.join(os.environ["LENS_OUT"], f"rank{trainer.accelerator.process_index}.pt"))
