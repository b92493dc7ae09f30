"""The frame-level term's fusion rules: sum (the rule every earlier bundle used) and max."""

from types import SimpleNamespace

import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.config import load_config
from diffinspect.scoring.diffusion import FrameTerm


class _Copod:
    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float64)

    def score(self, frames):
        return SimpleNamespace(scores=self.scores[: len(frames)])


def test_max_lets_either_detector_flag_a_part_and_sum_adds_them():
    diffusion = np.array([0.0, 10.0, 0.0, 1.0])  # robust z with scale (0, 1): as is
    copod = _Copod([0.0, 0.0, 8.0, 1.0])
    frames = [None] * 4
    summed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0)).combine(diffusion, frames)
    maxed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").combine(diffusion, frames)
    assert summed.tolist() == [0.0, 10.0, 8.0, 2.0]
    assert maxed.tolist() == [0.0, 10.0, 8.0, 1.0]  # a part both call mildly odd is not pushed up
    assert FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").to_dict()["rule"] == "max"


def test_unknown_rule_is_refused_in_config_and_manifest():
    with pytest.raises(DiffinspectError, match="score.fusion"):
        load_config(overrides={"score.fusion": "mean"})
    with pytest.raises(DiffinspectError, match="frame-term rule"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "mean")
