"""Reward modules: plain callables that score a batch of answers, composed with weights into a :class:`RewardSet`.

A reward module is a function (or a small class with ``__call__``) with the signature::

    reward(observations, completions, infos, **step) -> list[float]

for one environment step of a batch of envs: ``observations`` is the batch the policy answered (a vector
env's ``{"image": (N, H, W, 3) uint8, "text": (str, ...)}``), ``completions`` the policy's answers
(:class:`agents.policy.Completion`: ``text``, ``action``, ``valid``...), ``infos`` one dict per env: the
info of the step, for an env whose episode ended the info of its last step, not the auto-reset one (see
:func:`infos_per_env`). ``step`` holds ``env_rewards``, ``terminated`` and ``truncated`` (arrays of N),
``next_observations`` (the batch the step led to, or ``None`` when the caller did not give it) and may grow: modules take ``**step`` and ignore what they do not need, as TRL's reward functions take
``**kwargs``.

Modules are named in a registry and combined by specs ``NAME:WEIGHT[:KEY=VALUE,...]``::

    rewards = RewardSet.from_specs(["env:1.0", "invalid:-0.1", "shaping:1.0"], RewardContext(env_id=..., gamma=0.9))
    result = rewards(observations, completions, infos, env_rewards=..., terminated=..., truncated=...)
    result.total                       # (N,) sum of weight * term
    result.terms["shaping"]            # (N,) the term before weighting
    result.metrics()                   # {"rewards/env": mean, ..., "rewards/total": mean}

Built in: ``env``, ``invalid``, ``format``, ``shaping`` (:mod:`rewards.rules`), ``clip``
(:mod:`rewards.clip`, VLM-RM) and ``rm`` (:mod:`rewards.reward_model`, a learned Bradley-Terry model).
Third-party modules join with :func:`register_reward`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

RewardFn = Callable[..., Sequence[float]]
"""``(observations, completions, infos, **step) -> list[float]``, one float per env of the batch."""


class RewardFactory(Protocol):
    """Builds a reward module from the run's context and the spec's options (strings, as written)."""

    def __call__(self, context: RewardContext, options: dict[str, str]) -> RewardFn: ...


@dataclass(frozen=True)
class RewardContext:
    """What a reward module may need to know about the run, given once when the set is built."""

    env_id: str | None = None
    """Gymnasium id of the environment (``"vlmrl/GridWorld-v0"``): its LanguageSpec parses answers, and its
    prompts are the CLIP reward's default goal and baseline."""
    gamma: float | None = None
    """The algorithm's discount. Potential-based shaping must use the same gamma as the return it shapes
    (Ng et al. 1999); the algorithm passes its own."""
    device: str = "cpu"
    """Where model-based rewards (CLIP, reward model) run."""
    prompt_style: str = "cot"
    """The policy's answer style (``"cot"`` or ``"action"``), for ``format``."""


@dataclass(frozen=True)
class RewardSpec:
    """One parsed ``NAME:WEIGHT[:KEY=VALUE,...]``."""

    name: str
    weight: float
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class RewardResult:
    """The rewards of one step: the weighted total per env and every term per env (before weighting)."""

    total: np.ndarray
    terms: dict[str, np.ndarray]
    weights: dict[str, float]

    def parts(self, index: int) -> dict[str, float]:
        """Env ``index``'s weighted terms ``{name: weight * term}``, summing to its total (the trajectory
        store's ``reward_parts``)."""
        return {name: self.weights[name] * float(values[index]) for name, values in self.terms.items()}

    def metrics(self, active: np.ndarray | None = None) -> dict[str, float]:
        """Mean of each term over the (active) envs as ``rewards/<name>``, and ``rewards/total``."""
        mask = slice(None) if active is None else np.asarray(active, dtype=bool)
        out = {f"rewards/{name}": float(np.mean(values[mask])) for name, values in self.terms.items()}
        out["rewards/total"] = float(np.mean(self.total[mask]))
        return out


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(
    name: str, reward: RewardFn | None = None, *, factory: RewardFactory | None = None, overwrite: bool = False
) -> None:
    """Make a reward module available by ``name`` in specs.

    Give either ``reward``, a ready module that takes no options, or ``factory(context, options) -> module``
    for a module with options (``options`` are the spec's ``KEY=VALUE`` strings; :func:`options_to` turns
    them into a config dataclass).

    >>> def always_one(observations, completions, infos, **step):
    ...     return [1.0] * len(completions)
    >>> register_reward("always_one", always_one, overwrite=True)
    >>> "always_one" in reward_names()
    True
    """
    if (reward is None) == (factory is None):
        raise ValueError(f"register_reward({name!r}): give exactly one of reward= (no options) or factory=.")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"Reward name {name!r}: use letters, digits, '_' or '-' (it appears in specs and metric names)."
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"A reward module named {name!r} is already registered; pass overwrite=True to replace it.")
    if reward is not None:
        fixed = reward

        def factory(context: RewardContext, options: dict[str, str]) -> RewardFn:
            if options:
                raise ValueError(f"Reward {name!r} takes no options; remove {', '.join(sorted(options))}.")
            return fixed

    _REGISTRY[name] = factory


def reward_names() -> list[str]:
    """Every registered reward module's name."""
    return sorted(_REGISTRY)


def options_to(config_class: type, options: Mapping[str, str], reward_name: str) -> Any:
    """Build ``config_class`` (a dataclass) from a spec's ``KEY=VALUE`` strings, converting by field type.

    >>> @dataclass
    ... class Example:
    ...     gamma: float | None = None
    ...     prompts: tuple[str, ...] = ()
    >>> options_to(Example, {"gamma": "0.9", "prompts": "a cat|a dog"}, "example")
    Example(gamma=0.9, prompts=('a cat', 'a dog'))
    """
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Reward {reward_name!r} has no option {', '.join(unknown)}; its options are {', '.join(sorted(known))}."
        )
    values = {}
    for key, text in options.items():
        values[key] = _convert(text, hints[key], f"{reward_name}:{key}")
    return config_class(**values)


def _convert(text: str, hint: Any, where: str) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        return _convert(text, args[0], where)
    if typing.get_origin(hint) is tuple:
        # Lists in a spec are written with "|" (commas separate options): "goal=a red ball|the red ball".
        return tuple(_convert(part, args[0], where) for part in text.split("|") if part)
    if hint is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{where}={text!r}: use true or false.")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{where}={text!r} is not a number ({hint.__name__}).") from None
    return text


# ----------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------


def parse_reward_spec(text: str) -> RewardSpec:
    """``NAME`` (weight 1), ``NAME:WEIGHT``, or ``NAME:WEIGHT:KEY=VALUE,KEY=VALUE``.

    >>> parse_reward_spec("invalid:-0.1")
    RewardSpec(name='invalid', weight=-0.1, options={})
    >>> parse_reward_spec("rm:0.5:path=runs/rm,batch_size=8").options
    {'path': 'runs/rm', 'batch_size': '8'}
    """
    name, _, rest = text.strip().partition(":")
    weight_text, _, options_text = rest.partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"Unknown reward {name!r} in {text!r}; registered rewards: {', '.join(reward_names())}.")
    try:
        weight = float(weight_text) if weight_text.strip() else 1.0
    except ValueError:
        raise ValueError(
            f"Reward spec {text!r}: weight {weight_text!r} is not a number; write NAME:WEIGHT, e.g. {name}:0.5."
        ) from None
    if not math.isfinite(weight):
        raise ValueError(f"Reward spec {text!r}: the weight must be finite.")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in options_text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"Reward spec {text!r}: option {item!r} must be KEY=VALUE.")
        options[key.strip()] = value.strip()
    return RewardSpec(name, weight, options)


def check_reward_specs(specs: Sequence[str]) -> list[RewardSpec]:
    """Parse an algorithm's ``reward`` option before anything loads: at least one module, each known, each
    once, weights that are numbers. Raises ``ValueError`` with what to change.

    >>> [spec.name for spec in check_reward_specs(["env:1", "invalid:-1"])]
    ['env', 'invalid']
    """
    if not specs:
        raise ValueError("No reward modules: give at least one, e.g. --reward env:1 invalid:-1.")
    parsed = [parse_reward_spec(text) for text in specs]
    names = [spec.name for spec in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Reward {', '.join(duplicates)} is given twice; give each module once with one weight.")
    return parsed


# ----------------------------------------------------------------------------------------------------------
# The set the algorithms call
# ----------------------------------------------------------------------------------------------------------


class RewardSet:
    """Weighted reward modules, called once per environment step with the whole batch.

    Args:
        modules: ``(name, weight, module)`` triples; the names must be distinct (they are metric names).
    """

    def __init__(self, modules: Sequence[tuple[str, float, RewardFn]]) -> None:
        if not modules:
            raise ValueError("A RewardSet needs at least one module; the usual start is ['env:1.0'].")
        names = [name for name, _, _ in modules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Reward {', '.join(duplicates)} is given twice; give each module once with one weight.")
        self.modules = list(modules)

    @classmethod
    def from_specs(cls, specs: Sequence[str | RewardSpec], context: RewardContext | None = None) -> RewardSet:
        """Build every module named by ``specs`` (strings as :func:`parse_reward_spec` reads them)."""
        context = context or RewardContext()
        parsed = [parse_reward_spec(s) if isinstance(s, str) else s for s in specs]
        return cls([(s.name, s.weight, _REGISTRY[s.name](context, dict(s.options))) for s in parsed])

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, weight, _ in self.modules}

    def __call__(
        self,
        observations: Any,
        completions: Sequence[Any],
        infos: Sequence[dict] | dict,
        *,
        env_rewards: Sequence[float],
        terminated: Sequence[bool],
        truncated: Sequence[bool] | None = None,
        next_observations: Any = None,
        active: Sequence[bool] | None = None,
    ) -> RewardResult:
        """Score one vector-env step.

        Args:
            observations: The batch the policy answered (before the step), as the vector env gives it.
            completions: One per env (``None`` for an env that did not act, see ``active``).
            infos: One dict per env, or the vector env's info dict itself (converted by :func:`infos_per_env`).
            env_rewards: The environment's rewards of the step.
            terminated: Whether each env's episode ended in a terminal state.
            truncated: Whether each env's episode was cut (time limit); default: none.
            next_observations: The observations the step led to, for an ended episode its last one, not the
                reset's (see :func:`next_observations`); needed by rewards of the reached state (``clip``).
            active: Which envs stepped (group rollouts); the others get 0 in every term. Default: the envs
                whose completion is not ``None`` (as :class:`agents.rollout.RunnerStep` leaves them).
        """
        count = len(completions)
        arrays = {
            "env_rewards": np.asarray(env_rewards, dtype=np.float64),
            "terminated": np.asarray(terminated, dtype=bool),
            "truncated": np.zeros(count, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool),
        }
        if isinstance(infos, Mapping):
            infos = infos_per_env(infos, count, ended=arrays["terminated"] | arrays["truncated"])
        for key, value in [("infos", infos), *arrays.items()]:
            if len(value) != count:
                raise ValueError(f"RewardSet: {len(value)} {key} for {count} completions; give one per env.")
        if active is None:
            active = [completion is not None for completion in completions]
        indices = np.flatnonzero(np.asarray(active, dtype=bool))
        sub_observations = _take(observations, indices, count)
        sub_completions = [completions[i] for i in indices]
        sub_infos = [infos[i] for i in indices]
        sub_arrays: dict[str, Any] = {key: value[indices] for key, value in arrays.items()}
        sub_arrays["next_observations"] = (
            None if next_observations is None else _take(next_observations, indices, count)
        )
        terms: dict[str, np.ndarray] = {}
        total = np.zeros(count)
        for name, weight, module in self.modules:
            values = np.zeros(count)
            if len(indices):
                scored = np.asarray(
                    module(sub_observations, sub_completions, sub_infos, **sub_arrays), dtype=np.float64
                )
                if scored.shape != (len(indices),):
                    raise ValueError(
                        f"Reward {name!r} returned {scored.shape[0] if scored.ndim else 'a scalar'} values for "
                        f"{len(indices)} answers; a reward module returns one float per answer."
                    )
                if not np.all(np.isfinite(scored)):
                    raise ValueError(f"Reward {name!r} returned a non-finite value: {scored.tolist()}.")
                values[indices] = scored
            terms[name] = values
            total += weight * values
        return RewardResult(total=total, terms=terms, weights=self.weights)


def infos_per_env(info: Mapping[str, Any], count: int, ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """One info dict per env from a Gymnasium vector env's info (``key`` arrays with ``_key`` masks).

    With same-step autoreset an env whose episode ended has already been reset: its entries in ``info``
    belong to the new episode, and the step's own info is in ``info["final_info"]``; that is the one
    returned for it, since a reward scores the transition that happened. Which envs ended is
    ``info["_final_info"]``, or ``ended`` (terminated or truncated) when given.

    >>> info = {"success": np.array([False, True]), "_success": np.array([True, True])}
    >>> infos_per_env(info, 2)
    [{'success': False}, {'success': True}]
    """

    def split(source: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [{} for _ in range(count)]
        for key, values in source.items():
            if key.startswith("_") or key in ("final_info", "final_obs"):
                continue
            mask = source.get("_" + key, np.ones(count, dtype=bool))
            for index in range(count):
                if mask[index]:
                    value = values[index]
                    rows[index][key] = value.item() if isinstance(value, np.generic) else value
        return rows

    rows = split(info)
    if "final_info" in info:
        final = split(info["final_info"])
        if ended is None:
            ended = info.get("_final_info", np.zeros(count, dtype=bool))
        for index in np.flatnonzero(np.asarray(ended, dtype=bool)):
            rows[index] = final[index]
    return rows


def next_observations(observations: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """The observations a vector step led to: ``observations`` (what ``step`` returned), with each ended
    env's entry replaced by its episode's last observation (``info["final_obs"]``; same-step autoreset has
    already put the next episode's first observation in ``observations``)."""
    result = {
        key: value.copy() if isinstance(value, np.ndarray) else list(value) for key, value in observations.items()
    }
    final = info.get("final_obs")
    if final is None:
        return result
    mask = info.get("_final_obs", [item is not None for item in final])
    for index in np.flatnonzero(mask):
        for key, value in final[index].items():
            result[key][index] = value
    return {key: value if isinstance(value, np.ndarray) else tuple(value) for key, value in result.items()}


def _take(observations: Any, indices: np.ndarray, count: int) -> Any:
    if observations is None or len(indices) == count:
        return observations
    if isinstance(observations, Mapping):
        return {
            key: value[indices] if isinstance(value, np.ndarray) else type(value)(value[i] for i in indices)
            for key, value in observations.items()
        }
    return [observations[i] for i in indices]


# The built-in modules register themselves; the heavy ones (torch, transformers) import only when built.
from rewards import rules as _rules  # noqa: E402, F401


def _clip_factory(context: RewardContext, options: dict[str, str]) -> RewardFn:
    from rewards.clip import build_clip_reward

    return build_clip_reward(context, options)


def _reward_model_factory(context: RewardContext, options: dict[str, str]) -> RewardFn:
    from rewards.reward_model import build_reward_model_reward

    return build_reward_model_reward(context, options)


register_reward("clip", factory=_clip_factory, overwrite=True)
register_reward("rm", factory=_reward_model_factory, overwrite=True)

__all__ = [
    "RewardContext",
    "RewardFn",
    "RewardResult",
    "RewardSet",
    "RewardSpec",
    "infos_per_env",
    "next_observations",
    "options_to",
    "parse_reward_spec",
    "register_reward",
    "reward_names",
]
