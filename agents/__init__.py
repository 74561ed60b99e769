"""The LVLM policy and the algorithms that train it.

``from agents import load_policy`` is the entry point; the heavy imports (torch, transformers) happen on
first use, so ``import agents`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_policy": "agents.policy",
    "PolicyConfig": "agents.policy",
    "VLMPolicy": "agents.policy",
    "Completion": "agents.policy",
    "PPOConfig": "agents.ppo",
    "train": "agents.ppo",
    "evaluate_policy": "agents.evaluation",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")


__all__ = list(_EXPORTS)
