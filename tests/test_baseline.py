"""The SB3 CNN baseline: its budget is rounded to whole rollouts, and it says so."""

from __future__ import annotations

import json

import pytest

from experiments.baseline_sb3 import BaselineConfig, main


def test_a_budget_between_rollouts_is_rounded_up_with_a_warning(tmp_path, capsys):
    config = BaselineConfig(total_env_steps=20, num_envs=2, n_steps=8, eval_episodes=1, run_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match="whole rollouts of num_envs \\* n_steps = 16 steps: 20 asked, 32 will be"):
        main(config)
    assert json.loads(capsys.readouterr().out)["env_steps"] == 32
