"""Host syncs of one trainer step, pinned (see tests/nn/test_host_syncs.py)."""

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from fastvq.testing import count_syncs
from fastvq.train.trainer import Trainer


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_train_step_syncs(make_config, datasets, kmeans_init):
    # kmeans_init (the demo's quantizer): once its init ran, no step reads `initted` again.
    quantizer = f"type: VectorQuantize, codebook_size: 16, decay: 0.8, kmeans_init: {kmeans_init}"
    trainer = Trainer(make_config(f"model.quantizer={{{quantizer}}}"), datasets=datasets)
    batch = next(trainer._batches())
    trainer.train_step(iter([batch]))
    step = trainer.opt.step

    def adamw_step(*args, **kwargs):
        # AdamW reads its step counts with .item(): CPU tensors on any device, no GPU sync.
        with _disable_current_modes():
            return step(*args, **kwargs)

    trainer.opt.step = adamw_step
    with count_syncs() as syncs:
        logs = trainer.train_step(iter([batch]))
    where = sorted(w.split(":")[0] for _, w in syncs)
    # The quantizer's NaN/Inf check, the NaN guard's loss with every log value, the code-usage
    # range check, the gradient norm (clipping and the guard).
    assert where == [
        "ops/_validate.py",
        "train/metrics.py",
        "train/trainer.py",
        "train/trainer.py",
    ], syncs
    assert all(isinstance(v, float) for v in logs.values())
    assert torch.isfinite(torch.tensor(list(logs.values()))).all()
