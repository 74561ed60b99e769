"""Preference pairs from trajectory stores (``agents/pairs.py``), saved in TRL's vision DPO format.

    vlmrl pairs data/gridworld-policy --mode trajectory --out data/gridworld-pairs
    vlmrl pairs data/gridworld-policy --mode step --label success --out data/gridworld-step-pairs
    vlmrl pairs data/gridworld-expert data/gridworld-policy --mode expert --out data/gridworld-expert-pairs

The pair set is a ``datasets`` directory: ``vlmrl train <experiment> --algo dpo --pairs PATH`` trains on it,
and ``datasets.load_from_disk(PATH)`` is a training set for TRL's ``DPOTrainer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro


@dataclass
class PairsConfig:
    stores: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="STORE")]
    """Trajectory stores to pair (``vlmrl collect``); their steps are pooled."""
    out: str
    """New directory for the pair set."""
    mode: Literal["trajectory", "step", "expert"] = "trajectory"
    """``trajectory``: episodes of one seed by return (ETO); ``step``: answers at the same state by
    return-to-go (IPR); ``expert``: the expert's answer over a policy's at the same state."""
    label: Literal["return", "success"] = "return"
    """Rule that ranks (trajectory and step modes): the return (to go) or the episode's success."""
    min_margin: float = 0.0
    """Smallest score difference that makes a pair (ties never do). Expert mode: when > 0, the expert's
    return-to-go must beat the policy's by this much."""
    align: Literal["first", "aligned"] = "first"
    """Trajectory mode: pair the first step where the episodes answered differently at the same state, or
    every such step before their states part."""
    per_state: Literal["all", "best-worst", "by-action"] = "all"
    """Step mode: every two different answers at a state, or only its best over its worst (one pair per
    state: a policy that words its answers in many ways otherwise gives pairs quadratic in their number), or
    the answers of its best action over those of its worst, each action's value the mean over all its
    wordings (``by-action``)."""


def main(config: PairsConfig) -> dict:
    """Build, save and summarise the pairs; print the summary as JSON and return it."""
    from agents.pairs import build_pairs, save_pairs

    if not config.stores:
        raise ValueError("Name at least one trajectory store: vlmrl pairs STORE [STORE...] --out PATH.")
    pairs, counts = build_pairs(
        config.stores, config.mode, config.label, config.min_margin, config.align, config.per_state
    )
    summary = {
        "stores": list(config.stores),
        "mode": config.mode,
        "label": "expert" if config.mode == "expert" else config.label,
        "min_margin": config.min_margin,
        "align": config.align,
        "per_state": config.per_state,
        "counts": counts,
    }
    save_pairs(pairs, config.out, summary)
    summary = {"out": config.out, "pairs": len(pairs), **summary}
    print(json.dumps(summary, indent=2))
    return summary
