"""What training and distillation share: the budget, the checkpoint, resume and Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffinspect import DiffinspectError
from diffinspect.train.loop import UNBOUNDED, Checkpoint, Clock, budget


def test_budget_defaults_apply_only_when_nothing_is_named() -> None:
    assert budget(None, None, 100, 5.0) == (100, 5.0)
    assert budget(7, None, 100, 5.0) == (7, None)
    assert budget(None, 2.0, 100, 5.0) == (UNBOUNDED, 2.0)
    assert budget(7, 2.0, 100, 5.0) == (7, 2.0)


def test_clock_counts_the_time_before_a_resume() -> None:
    assert Clock(1.0, before=61.0).over() and not Clock(None, before=1e9).over()
    assert Clock(2.0, before=60.0).share() == pytest.approx(0.5, abs=0.01)


def test_checkpoint_round_trip_and_missing_one(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "run.checkpoint", "distillation")
    with pytest.raises(DiffinspectError, match="no distillation checkpoint at"):
        ckpt.load()
    ckpt.save({"step": 3, "w": torch.ones(2)})
    assert not ckpt.path.with_suffix(".tmp").exists()
    state = ckpt.load()
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(2))
    ckpt.clear()
    assert not ckpt.folder.exists()


def test_ctrl_c_saves_and_says_how_to_continue(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "c")
    saved = []
    with pytest.raises(DiffinspectError, match=r"training interrupted at step 4; .*--resume"), \
            ckpt.on_interrupt("training", "step", lambda: 4, lambda: saved.append(True)):
        raise KeyboardInterrupt
    assert saved == [True]
