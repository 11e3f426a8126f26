"""The Trainer driven one step at a time, in this process, gives what the ``simpo-train`` loop gives."""

from __future__ import annotations

import signal

import pytest
import torch
import yaml
from train_utils import write_config

from simpo_mcore.config import load_config
from simpo_mcore.parallel import distributed
from simpo_mcore.train import Trainer


@pytest.mark.slow
def test_train_step_by_step_equals_the_loop(tmp_path, tiny, straight):
    """Two ``train_step`` calls reproduce steps 1-2 of the straight single-rank run bit for bit (loss, lr,
    grad norm); the checkpointer saves nothing off the interval and writes a checkpoint at the last step (2);
    a resume with another global batch counts its steps in the new batch."""
    base = straight("tp1")
    path = write_config(tmp_path / "t.yaml", *tiny, output_dir=str(tmp_path / "run"))
    cfg = load_config(path)
    assert yaml.safe_load(path.read_text())["checkpoint"]["save_interval"] == 0
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    torch.set_num_threads(1)  # as the launched ranks run: the same reduction order, the same bits
    with distributed(cfg.parallel, cfg.train.seed) as layout:
        trainer = Trainer.build(cfg, layout)
        try:
            assert trainer.state.step == 0 and trainer.total_steps == 20
            for step in (1, 2):
                record = trainer.train_step()
                assert trainer.state.step == step
                assert trainer.state.consumed_pairs == step * cfg.train.global_batch_pairs
                for key in ("loss", "lr", "grad_norm", "rewards/accuracies"):
                    assert record[key] == base[step][key], (step, key)
            assert trainer.checkpointer.save(2) == []
            assert not (tmp_path / "run" / "checkpoints").exists()
            assert trainer.should_stop() is None
            (saved,) = trainer.checkpointer.save(2, last_step=True)  # published before it returns
            assert saved == tmp_path / "run" / "checkpoints" / "step_0000002"
            assert (saved / "simpo_mcore.json").is_file() and trainer.checkpointer.save(2, last_step=True) == []
            trainer.close()

            # Resumed with half the global batch (allowed): the step counts batches of the new size from the
            # pairs consumed (16 / 4 = step 4 of 64 in the epoch), and so does the schedule's update index.
            half = load_config(path, ["train.global_batch_pairs=4", "train.max_steps=null",
                                      "checkpoint.allow_changes=[train.global_batch_pairs]"])
            trainer = Trainer.build(half, layout)
            assert (trainer.state.step, trainer.state.consumed_pairs, trainer.total_steps) == (4, 16, 64)
            record = trainer.train_step()
            assert (trainer.state.step, trainer.state.consumed_pairs) == (5, 20)
            assert record["lr"] == trainer.schedule.lr_at(4)
        finally:
            trainer.close()
            torch.set_num_threads(threads)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
