"""The SFT settings tinyqa hands to TRL: what each config key becomes in the trainer."""

from __future__ import annotations

import math

import pytest

from tinyqa.config import load_config
from tinyqa.training import sft_config


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.5])
def test_warmup_ratio_becomes_that_share_of_the_steps(tmp_path, ratio):
    cfg = load_config(None, [f"train.warmup_ratio={ratio}"])
    args = sft_config(cfg, str(tmp_path), on_cpu=True, rank=0)
    for total in (10, 200, 1001):
        assert args.get_warmup_steps(total) == math.ceil(total * ratio)
