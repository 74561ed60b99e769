"""Pure loss functions on tensors, shared by the algorithms. No model, no config: numbers in, numbers out.

Each one is checked against a hand computation in ``tests/test_losses.py``.
"""

from __future__ import annotations

import numpy as np
import torch


def clipped_surrogate(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss per sample (Schulman et al. 2017, https://arxiv.org/abs/1707.06347).

    ``clip_low`` and ``clip_high`` may differ (DAPO's clip-higher, https://arxiv.org/abs/2503.14476);
    PPO uses one coefficient for both. Returns ``(loss per sample, ratio)``.

    >>> loss, ratio = clipped_surrogate(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2, 0.2)
    >>> round(float(loss), 4), round(float(ratio), 4)  # ratio e^0.5 = 1.6487 is clipped to 1.2
    (-1.2, 1.6487)
    """
    ratio = (logprob - old_logprob).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.max(unclipped, clipped), ratio


def value_loss(value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Half squared error to the returns per sample, optionally clipped around the old values (PPO2).

    >>> float(value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3.0]), None))
    0.5
    >>> float(value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3.0]), 0.5))  # max(1, 6.25)/2
    3.125
    """
    squared = (value - returns) ** 2
    if clip is None:
        return 0.5 * squared
    clipped = old_value + (value - old_value).clamp(-clip, clip)
    return 0.5 * torch.max(squared, (clipped - returns) ** 2)


def k3_kl(logprob: torch.Tensor, reference_logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over tokens of the k3 estimate of KL(policy || reference).

    k3 = exp(d) - 1 - d with d = log p_ref - log p (http://joschu.net/blog/kl-approx.html): unbiased for
    samples drawn from the policy and never negative. Arguments are ``(B, T)`` with a boolean ``mask``.

    >>> round(float(k3_kl(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[True, True]]))), 4)
    0.1839
    """
    delta = (reference_logprob - logprob).masked_fill(~mask, 0.0)
    per_token = delta.exp() - 1 - delta
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1)


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """Mean of ``(r - 1) - log r``: the k3 estimate of KL(old || new) that PPO logs and stops early on."""
    return ((log_ratio.exp() - 1) - log_ratio).mean()


def clip_fraction(ratio: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """Fraction of samples whose ratio left the clipping range."""
    return ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float().mean()


def token_mean_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean negative log-likelihood over its tokens (``(B, T)`` log-probs and boolean mask).

    >>> token_mean_nll(torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[True, True, False]])).tolist()
    [2.0]
    """
    return -(token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# ----------------------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO, GiGPO)
# ----------------------------------------------------------------------------------------------------------


def group_advantages(returns: np.ndarray, groups: np.ndarray, scale: bool = True, eps: float = 1e-6) -> np.ndarray:
    """Each trajectory's return relative to its group's: ``(R - mean) / (std + eps)`` (GRPO, DeepSeekMath,
    https://arxiv.org/abs/2402.03300), or ``R - mean`` with ``scale=False`` (Dr. GRPO,
    https://arxiv.org/abs/2503.20783; verl-agent's ``mean_norm``). ``std`` is the population standard
    deviation; a group whose returns are all equal gets 0.

    >>> group_advantages(np.array([1.0, 0.0, 3.0, 3.0]), np.array([0, 0, 1, 1])).round(3).tolist()
    [1.0, -1.0, 0.0, 0.0]
    >>> group_advantages(np.array([1.0, 0.0, 5.0]), np.array([0, 0, 0]), scale=False).tolist()
    [-1.0, -2.0, 3.0]
    """
    returns = np.asarray(returns, dtype=np.float64)
    advantages = np.zeros_like(returns)
    for group in np.unique(groups):
        members = groups == group
        centred = returns[members] - returns[members].mean()
        std = returns[members].std()
        if scale:
            centred = centred / (std + eps) if std > 0 else np.zeros_like(centred)
        advantages[members] = centred
    return advantages


def anchor_advantages(
    step_returns: np.ndarray, groups: np.ndarray, states: list, scale: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """GiGPO's step-level advantages (https://arxiv.org/abs/2505.10978): steps of one group that saw the same
    state (``states[i]``: any hashable key, e.g. a hash of image and text) form an anchor group, and each
    step's discounted return-to-go is normalised within it, as :func:`group_advantages` does per trajectory.
    A state seen once gets 0.

    >>> anchor_advantages(np.array([1.0, 3.0, 2.0, 5.0]), np.array([0, 0, 0, 1]), ["a", "a", "b", "a"]).round(3).tolist()
    [-1.0, 1.0, 0.0, 0.0]
    """
    keys = [(group, state) for group, state in zip(np.asarray(groups).tolist(), states)]
    index = {key: number for number, key in enumerate(dict.fromkeys(keys))}
    return group_advantages(step_returns, np.array([index[key] for key in keys]), scale=scale, eps=eps)


def discounted_returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1}`` over one episode's rewards.

    >>> discounted_returns_to_go(np.array([0.0, 0.0, 1.0]), 0.5).tolist()
    [0.25, 0.5, 1.0]
    """
    result = np.zeros(len(rewards))
    following = 0.0
    for t in reversed(range(len(rewards))):
        following = rewards[t] + gamma * following
        result[t] = following
    return result


# ----------------------------------------------------------------------------------------------------------
# Preference losses (DPO and its variants)
# ----------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    chosen_logprob: torch.Tensor,
    rejected_logprob: torch.Tensor,
    reference_chosen_logprob: torch.Tensor,
    reference_rejected_logprob: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss on answer log-probs; returns ``(loss, chosen_reward, rejected_reward)``.

    The implicit rewards are ``beta * (log pi - log pi_ref)`` of each answer and ``h`` is the log-ratio
    difference ``(log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r)``:

    * ``sigmoid``: DPO, ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7);
    * ``ipo``: IPO, ``(h - 1 / (2 beta))**2`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17):
      a squared loss that stops pushing once the margin reaches ``1 / (2 beta)``, where DPO never stops;
    * ``hinge``: SLiC's ``max(0, 1 - beta * h)`` (Zhao et al. 2023, https://arxiv.org/abs/2305.10425), as
      TRL's ``hinge``.

    >>> zero = torch.zeros(1)
    >>> round(float(dpo_loss(zero, zero, zero, zero, 0.1)[0]), 4)  # policy = reference: log 2
    0.6931
    >>> float(dpo_loss(torch.tensor([1.0]), zero, zero, zero, 0.5, "ipo")[0])  # (1 - 1)^2
    0.0
    >>> float(dpo_loss(torch.tensor([1.0]), zero, zero, zero, 0.5, "hinge")[0])  # 1 - 0.5
    0.5
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss type {loss_type!r}; use one of {DPO_LOSS_TYPES}.")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    chosen_ratio = chosen_logprob - reference_chosen_logprob
    rejected_ratio = rejected_logprob - reference_rejected_logprob
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -torch.nn.functional.logsigmoid(beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = torch.relu(1 - beta * h)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
