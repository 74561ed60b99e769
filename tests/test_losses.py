"""The pure loss functions against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.losses import (
    anchor_advantages,
    approx_kl,
    clip_fraction,
    clipped_surrogate,
    discounted_returns_to_go,
    group_advantages,
    k3_kl,
    token_mean_nll,
    value_loss,
)


def test_clipped_surrogate_takes_the_pessimistic_side_with_separate_low_and_high_clips():
    logprob = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, ratio = clipped_surrogate(logprob, torch.zeros(4), advantages, clip_low=0.2, clip_high=0.28)
    # A > 0: min(r, clip(r)) * A -> 1.28 (clipped high), 0.5 (unclipped: pessimistic);
    # A < 0: max(r, clip(r)) * A -> -1.5 (unclipped), -0.8 (clipped low).
    torch.testing.assert_close(loss, torch.tensor([-1.28, -0.5, 1.5, 0.8]))
    torch.testing.assert_close(ratio, torch.tensor([1.5, 0.5, 1.5, 0.5]))
    assert float(clip_fraction(ratio, 0.2, 0.28)) == 1.0
    assert float(clip_fraction(torch.tensor([1.1, 0.9]), 0.2, 0.28)) == 0.0


def test_value_loss_clipped_around_the_old_value():
    new, old, target = torch.tensor([2.0, 0.05]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(value_loss(new, old, target, None), torch.tensor([0.5, 0.5 * 0.95**2]))
    # clipped values 0.5 and 0.05: the larger error wins
    torch.testing.assert_close(value_loss(new, old, target, 0.5), torch.tensor([0.5 * 2.5**2, 0.5 * 0.95**2]))


def test_k3_kl_and_approx_kl():
    logprob = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    reference = torch.tensor([[math.log(0.25), math.log(0.25), 5.0]])
    mask = torch.tensor([[True, True, False]])
    delta = math.log(0.25) - math.log(0.5)
    expected = ((math.exp(delta) - 1 - delta) + 0.0) / 2  # the masked third token is ignored
    assert float(k3_kl(logprob, reference, mask)) == pytest.approx(expected)
    assert float(approx_kl(torch.tensor([0.0, 0.0]))) == 0.0


def test_token_mean_nll_ignores_padding():
    token_logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(token_mean_nll(token_logprobs, mask), torch.tensor([1.5, 4.0]))


def test_group_advantages_by_hand_with_both_normalisations():
    # Two groups: trajectories of unequal length do not matter, only their returns.
    returns = np.array([1.0, 0.0, 0.0, 0.0, -1.0, 2.0])
    groups = np.array([0, 0, 0, 0, 1, 1])
    mean0, std0 = 0.25, math.sqrt((0.75**2 + 3 * 0.25**2) / 4)
    expected = [0.75 / std0, -0.25 / std0, -0.25 / std0, -0.25 / std0, -1.0, 1.0]
    np.testing.assert_allclose(group_advantages(returns, groups, eps=0.0), expected)
    np.testing.assert_allclose(group_advantages(returns, groups, scale=False), [0.75, -0.25, -0.25, -0.25, -1.5, 1.5])
    assert mean0 == returns[:4].mean()
    np.testing.assert_array_equal(group_advantages(np.ones(3), np.zeros(3)), np.zeros(3))  # all equal: no signal


def test_gigpo_anchor_groups_two_trajectories_through_the_same_state():
    # One group, two trajectories from the same start: A goes s0 -> s1 -> goal (rewards 0, 1),
    # B goes s0 -> s2 -> s1 -> goal (rewards 0, 0, 1). s0 and s1 are shared anchor states.
    gamma = 0.5
    returns_a = discounted_returns_to_go(np.array([0.0, 1.0]), gamma)  # [0.5, 1.0]
    returns_b = discounted_returns_to_go(np.array([0.0, 0.0, 1.0]), gamma)  # [0.25, 0.5, 1.0]
    step_returns = np.concatenate([returns_a, returns_b])
    states = ["s0", "s1", "s0", "s2", "s1"]
    advantages = anchor_advantages(step_returns, np.zeros(5, dtype=int), states, eps=0.0)
    # s0: {0.5 (A), 0.25 (B)} -> +1, -1; s1: {1.0, 1.0} -> 0, 0; s2 alone -> 0
    np.testing.assert_allclose(advantages, [1.0, 0.0, -1.0, 0.0, 0.0])
    unscaled = anchor_advantages(step_returns, np.zeros(5, dtype=int), states, scale=False)
    np.testing.assert_allclose(unscaled, [0.125, 0.0, -0.125, 0.0, 0.0])
    # The same state in another group is another anchor group.
    other = anchor_advantages(step_returns, np.array([0, 0, 1, 1, 1]), states)
    np.testing.assert_allclose(other, np.zeros(5))


def test_loss_totals_average_over_the_steps_taken_and_count_the_skipped():
    from agents.optim import LossTotals

    totals = LossTotals()
    for parts in ({"policy": 1.0, "value": 4.0}, None, {"policy": 3.0, "value": 0.0}):
        totals.add(parts)
    assert totals.metrics() == {"losses/policy": 2.0, "losses/value": 2.0, "losses/skipped_steps": 1}
    assert LossTotals().metrics() == {"losses/skipped_steps": 0}
