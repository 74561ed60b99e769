"""Running a text-generating policy in Gymnasium vector environments: the pieces no library provides.

:class:`EnvRunner` is the one loop every algorithm and the evaluation share: it owns the vector env and
the observation in hand, and one :meth:`EnvRunner.step` is *act -> env actions -> env step -> episode
statistics*. Around it:

* :func:`make_vector_env` builds the vector env (same-step autoreset, so every step is a real transition
  and the final observation of a truncated episode is at hand for bootstrapping; errors name the env);
  with ``continuous=True`` each env is stepped through its ``step_continuous`` (:class:`ContinuousActions`),
  for a policy whose actions are vectors (``agents/vla.py``);
* :func:`env_actions` turns parsed answers into environment actions under an explicit invalid-answer rule;
* :class:`EpisodeStats` keeps per-env returns, lengths and successes of finished episodes;
* :class:`TrackedEnv` records how each env's current episode began and which actions it took, so a
  checkpoint can restore any registered env by replaying them, without pickling the env (a
  pygame-rendered env, or one made with a lambda, cannot be pickled).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from agents.policy import Completion
from envs.language import extract_thoughts
from rewards import infos_per_env, next_observations

InvalidRule = Literal["default", "random"]
SuccessRule = Literal["terminated_positive_reward", "positive_return"]
SUCCESS_RULES: tuple[str, ...] = ("terminated_positive_reward", "positive_return")


class TrackedEnv(gym.Wrapper):
    """Name the env in its errors, and record the current episode so it can be replayed.

    The record is the reset seed (or, for an auto-reset without a seed, the state of the env's
    ``np_random`` just before the reset), the reset options, and every action since. An env that draws
    its randomness from ``self.np_random``, as Gymnasium asks, is back in exactly the same state after
    :meth:`replay`; :meth:`EnvRunner.load_state_dict` checks that and warns when it is not.
    """

    def __init__(self, env: gym.Env, index: int) -> None:
        super().__init__(env)
        self.index = index
        self.episode: dict[str, Any] = {"seed": None, "rng": None, "options": None, "actions": []}
        self.next_seed: Callable[[], int] | None = None
        """Where the seed of an automatic reset comes from (``None``: the env's own ``np_random`` goes on)."""

    @property
    def name(self) -> str:
        spec_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
        return f"env {self.index} ({spec_id})"

    def step(self, action: Any):
        self.episode["actions"].append(copy.deepcopy(action))
        try:
            return self.env.step(action)
        except Exception as error:
            raise RuntimeError(f"{self.name} failed in step({action!r}): {error!r}") from error

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self.next_seed is not None:
            seed = self.next_seed()
        rng = None
        if seed is None:
            try:
                rng = copy.deepcopy(self.env.unwrapped.np_random.bit_generator.state)
            except AttributeError:  # an env without a Gymnasium np_random: replay is best effort
                rng = None
        self.episode = {"seed": seed, "rng": rng, "options": copy.deepcopy(options), "actions": []}
        try:
            return self.env.reset(seed=seed, options=options)
        except Exception as error:
            raise RuntimeError(f"{self.name} failed in reset(): {error!r}") from error

    def replay(self, episode: dict[str, Any]) -> Any:
        """Bring the env to the state ``episode`` recorded; return the observation it then shows."""
        if episode["seed"] is None and episode["rng"] is not None:
            self.env.unwrapped.np_random.bit_generator.state = copy.deepcopy(episode["rng"])
        next_seed, self.next_seed = self.next_seed, None
        try:
            observation, _ = self.reset(seed=episode["seed"], options=episode["options"])
        finally:
            self.next_seed = next_seed
        self.episode["rng"] = copy.deepcopy(episode["rng"])
        for action in episode["actions"]:
            observation, *_ = self.step(action)
        return observation


class ContinuousActions(gym.Wrapper):
    """Step an env with continuous actions: ``step(action)`` is ``env.unwrapped.step_continuous(action)`` and
    the action space is ``env.unwrapped.continuous_action_space`` (Reach and Push).

    ``step_continuous`` is the env's own method, so Gymnasium's wrappers from ``gym.make`` (``TimeLimit``,
    the order and passive checkers) are bypassed: :func:`continuous_env` puts the registered time limit back
    on top, so that an env that does not end its own episodes still ends them (Reach and Push truncate at
    their own ``max_steps``, which equals their registered limit).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        inner = env.unwrapped
        if not (hasattr(inner, "continuous_action_space") and callable(getattr(inner, "step_continuous", None))):
            name = env.spec.id if env.spec is not None else type(inner).__name__
            raise ValueError(
                f"{name} has no continuous action space (env.unwrapped.continuous_action_space and "
                "step_continuous); use a discrete action head."
            )
        self.action_space = inner.continuous_action_space

    def step(self, action: Any):
        return self.env.unwrapped.step_continuous(np.asarray(action, dtype=np.float64))


def continuous_env(env: gym.Env) -> gym.Env:
    """``env`` (from ``gym.make``) stepped with continuous actions, under its registered ``max_episode_steps``."""
    limit = env.spec.max_episode_steps if env.spec is not None else None
    continuous = ContinuousActions(env)
    return continuous if limit is None else gym.wrappers.TimeLimit(continuous, limit)


def make_vector_env(
    env_id: str,
    num_envs: int,
    env_kwargs: dict[str, Any] | None = None,
    first_index: int = 0,
    continuous: bool = False,
) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies of ``env_id`` in one synchronous vector env with same-step autoreset; errors name
    each env by its index in the whole run (``first_index`` upward: a rank's envs are a slice of the run's).
    ``continuous``: step each env with vectors (:func:`continuous_env`)."""
    import envs  # noqa: F401 - registers the vlmrl environments

    def thunk(index: int):
        def make() -> gym.Env:
            env = gym.make(env_id, **(env_kwargs or {}))
            return TrackedEnv(continuous_env(env) if continuous else env, index)

        return make

    return gym.vector.SyncVectorEnv(
        [thunk(first_index + i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def env_actions(
    completions: Sequence[Completion],
    rule: InvalidRule,
    default_action: int,
    num_actions: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Environment actions for a batch of answers, and which answers were invalid.

    An invalid answer still has to move the environment. ``"default"`` takes ``default_action``;
    ``"random"`` takes a uniformly random action. Either way the update credits the log-prob of the text
    the model actually wrote (never of the substitute action), and the caller adds the invalid-answer
    penalty to the reward: RL4VLM silently substituted a random action without penalty, which credits
    tokens for a choice they never made.
    """
    actions = np.zeros(len(completions), dtype=np.int64)
    invalid = np.zeros(len(completions), dtype=bool)
    for index, completion in enumerate(completions):
        if completion.action is not None:
            actions[index] = completion.action
        else:
            invalid[index] = True
            actions[index] = default_action if rule == "default" else rng.integers(num_actions)
    return actions, invalid


@dataclass
class EpisodeStats:
    """Returns, lengths and successes of the episodes that finished, per vector env.

    Success is ``info["success"]`` of the episode's last step when the env reports it. An env that does
    not (most third-party envs) is judged by ``success_rule``: ``"terminated_positive_reward"`` (the
    default) counts an episode that ended by termination (not by a time limit) with a positive last
    reward, as FrozenLake's gift or a goal bonus; ``"positive_return"`` counts a positive episode return.
    """

    num_envs: int
    success_rule: SuccessRule = "terminated_positive_reward"
    returns: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    finished: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.success_rule not in SUCCESS_RULES:
            raise ValueError(f"success_rule must be one of {SUCCESS_RULES}, got {self.success_rule!r}.")
        self.returns = np.zeros(self.num_envs)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def update(
        self,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        info: dict,
        active: np.ndarray | None = None,
    ) -> list[dict[str, float]]:
        """Add one vector step (of the ``active`` envs only, when given); return the episodes it finished
        (each with its ``env`` index)."""
        self.returns += rewards
        self.lengths += 1 if active is None else np.asarray(active, dtype=np.int64)
        ended = np.logical_or(terminated, truncated)
        final_info = info.get("final_info", {})
        # Vector envs mark which envs' infos hold a key with a "_key" mask.
        reported = final_info.get("_success", np.full(self.num_envs, "success" in final_info))
        now = []
        for index in np.flatnonzero(ended):
            if reported[index]:
                success = bool(final_info["success"][index])
            elif self.success_rule == "terminated_positive_reward":
                success = bool(terminated[index]) and float(rewards[index]) > 0
            else:
                success = float(self.returns[index]) > 0
            episode = {
                "env": int(index),
                "return": float(self.returns[index]),
                "length": int(self.lengths[index]),
                "success": success,
            }
            now.append(episode)
            self.returns[index] = 0.0
            self.lengths[index] = 0
        self.finished.extend(now)
        return now

    def pop(self) -> list[dict[str, float]]:
        """The episodes finished since the last call."""
        finished, self.finished = self.finished, []
        return finished


def episode_metrics(finished: list[dict[str, float]]) -> dict[str, float]:
    """Mean return, success and length of the episodes that ended (nothing when none did)."""
    if not finished:
        return {}
    return {
        "charts/episodic_return": float(np.mean([e["return"] for e in finished])),
        "charts/success_rate": float(np.mean([e["success"] for e in finished])),
        "charts/episode_length": float(np.mean([e["length"] for e in finished])),
    }


@dataclass
class RunnerStep:
    """What one :meth:`EnvRunner.step` did, for every env of the vector env."""

    observations: dict[str, Any]
    """The observations the policy answered (the batch a vector env returns)."""
    completions: list[Completion]
    actions: np.ndarray
    """The env actions taken (the default or a random action for an invalid answer)."""
    invalid: np.ndarray
    rewards: np.ndarray
    """The environment's rewards (no penalty added: that is the algorithm's or the reward modules' call)."""
    terminated: np.ndarray
    truncated: np.ndarray
    final_observations: dict[int, Any]
    """Env index -> last observation of an episode that was truncated (for bootstrapping)."""
    finished: list[dict[str, float]]
    """Episodes that ended on this step: ``env``, ``return``, ``length``, ``success``."""
    episode_seeds: list[int | None]
    """Per env: the reset seed of the episode this step belongs to (``None`` after an unseeded reset)."""
    episode_steps: np.ndarray
    """Per env: the index of this step within its episode (0 = the episode's first step)."""
    thoughts_true: np.ndarray
    """Per env: 1.0 when the answer's thoughts state the observed state truly (the env's ``check_thoughts``),
    0.0 when they do not or there are none, NaN when nothing was checked (action-only answers, or an env
    without a checker)."""
    act_seconds: float
    generated_tokens: int
    infos: list[dict[str, Any]] = field(default_factory=list)
    """Per env: the info of its step (for an episode that ended, its last step's, not the reset's); ``{}``
    for an env that did not step. What reward modules read (e.g. shaping's potentials)."""
    next_observations: dict[str, Any] | None = None
    """The observations the step led to, an ended episode's last one in place of the reset's (for reward
    modules that score the reached state, such as ``clip``)."""


class EnvRunner:
    """The vector env, the observation in hand, and the act -> env action -> step -> statistics loop.

    Training and evaluation both step through this class, so there is one place where answers become
    actions and episodes are counted. Its whole state (:meth:`state_dict`) is plain data: the current
    observations, the open episodes' statistics and, per env, how to replay its current episode.
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        env_kwargs: dict[str, Any] | None = None,
        *,
        seed: int,
        rng: np.random.Generator,
        invalid_rule: InvalidRule = "default",
        invalid_default_action: int = 0,
        success_rule: SuccessRule = "terminated_positive_reward",
        on_step: Callable[[int], Any] | None = None,
        episode_seeds: Iterator[int] | Sequence[Iterator[int]] | None = None,
        first_env: int = 0,
        continuous: bool = False,
    ) -> None:
        import envs

        self.env_id = env_id
        self.spec = envs.get_language(env_id)
        self.num_envs = num_envs
        self.rng = rng
        self.invalid_rule = invalid_rule
        self.invalid_default_action = invalid_default_action
        self.on_step = on_step
        self.first_env = first_env
        """Index in the whole run of this runner's env 0 (a rank's share of a data-parallel run starts there);
        episodes it reports carry run-wide ``env`` indices."""
        self.continuous = continuous
        """The envs take continuous actions (a policy whose ``act`` gives vectors, ``agents/vla.py``)."""
        self.vector_env = make_vector_env(env_id, num_envs, env_kwargs, first_env, continuous)
        self.recorder: Any = None
        """An optional :class:`~agents.trajectories.EpisodeRecorder` that stores the episodes played."""
        if episode_seeds is None:
            self.observations, _ = self.vector_env.reset(seed=seed)
        else:  # every episode of every env starts from the next seed (stored, and exactly replayable),
            # drawn from one iterator all envs share or from each env's own
            per_env = list(episode_seeds) if isinstance(episode_seeds, (list, tuple)) else [episode_seeds] * num_envs
            self.observations, _ = self.vector_env.reset(seed=[next(seeds) for seeds in per_env])
            for env, seeds in zip(self.vector_env.envs, per_env):
                env.next_seed = lambda seeds=seeds: next(seeds)
        self.thought_checkers = [envs.thought_checker(env) for env in self.vector_env.envs]
        self.stats = EpisodeStats(num_envs, success_rule)
        self.steps = 0
        """Environment steps taken so far, all envs together."""

    def step(self, policy, greedy: bool = False, active: np.ndarray | None = None) -> RunnerStep:
        """Answer the observations in hand with one batched ``act`` and step every env once.

        With ``active`` (a boolean mask), only those envs answer and step, and an env whose episode ends
        is not reset: it waits for :meth:`reset` (group rollouts such as GRPO's play whole episodes in
        rounds). The per-env fields of the result hold ``None``/0 for the envs that did not step.
        """
        observations = self.observations
        indices = np.arange(self.num_envs) if active is None else np.flatnonzero(active)
        start = time.perf_counter()
        answered = policy.act(_take(observations, indices), self.spec, greedy=greedy)
        act_seconds = time.perf_counter() - start
        completions: list[Completion | None] = [None] * self.num_envs
        for index, completion in zip(indices, answered):
            completions[index] = completion
        invalid = np.zeros(self.num_envs, dtype=bool)
        if self.continuous:  # an action head's vectors: always valid
            space = self.vector_env.single_action_space
            actions = np.zeros((self.num_envs, *space.shape), dtype=space.dtype)
            for index, completion in zip(indices, answered):
                actions[index] = completion.action
        else:
            actions = np.zeros(self.num_envs, dtype=np.int64)
            actions[indices], invalid[indices] = env_actions(
                answered, self.invalid_rule, self.invalid_default_action, len(self.spec.action_names), self.rng
            )
        thoughts_true = self._check_thoughts(completions, getattr(policy, "config", None))
        episode_seeds = [env.episode["seed"] for env in self.vector_env.envs]
        episode_steps = self.stats.lengths.copy()
        if active is None:
            self.observations, rewards, terminated, truncated, info = self.vector_env.step(actions)
            infos = infos_per_env(info, self.num_envs, ended=terminated | truncated)
            reached = next_observations(self.observations, info)
        else:
            rewards, terminated, truncated, info, infos = self._step_some(indices, actions)
            reached = next_observations(self.observations, {})  # no autoreset: the observations are reached
        finished = self.stats.update(rewards, terminated, truncated, info, active)
        for episode in finished:  # the same dicts as in self.stats.finished
            episode["env"] += self.first_env
        cut = np.flatnonzero(truncated & ~terminated)
        final_observations = {int(i): info["final_obs"][i] for i in cut}
        self.steps += len(indices)
        if self.on_step is not None:
            self.on_step(len(indices))
        result = RunnerStep(
            observations=observations,
            completions=completions,
            actions=actions,
            invalid=invalid,
            rewards=np.asarray(rewards, dtype=np.float64),
            terminated=terminated,
            truncated=truncated,
            final_observations=final_observations,
            finished=finished,
            act_seconds=act_seconds,
            generated_tokens=sum(len(c.response_ids) for c in answered),
            episode_seeds=episode_seeds,
            episode_steps=episode_steps,
            thoughts_true=thoughts_true,
            infos=infos,
            next_observations=reached,
        )
        if self.recorder is not None:
            self.recorder.add(result)
        return result

    def _step_some(
        self, indices: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, list[dict]]:
        """Step the envs at ``indices`` one by one, without autoreset; the others keep their observation.
        Returns the vector-style info (for the episode statistics) and each env's own info."""
        rewards = np.zeros(self.num_envs)
        terminated, truncated = np.zeros(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool)
        success, reported = np.zeros(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool)
        final_obs: list[Any] = [None] * self.num_envs
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for index in indices:
            observation, reward, term, trunc, env_info = self.vector_env.envs[index].step(actions[index])
            infos[index] = dict(env_info)
            rewards[index], terminated[index], truncated[index] = reward, term, trunc
            _set_observation(self.observations, index, observation)
            if term or trunc:
                final_obs[index] = observation
                if "success" in env_info:
                    success[index], reported[index] = bool(env_info["success"]), True
        info = {"final_info": {"success": success, "_success": reported}, "final_obs": final_obs}
        return rewards, terminated, truncated, info, infos

    def reset(self, seeds: Sequence[int]) -> None:
        """Start a new episode in every env, env ``i`` from ``seeds[i]`` (a group rollout's round)."""
        self.observations, _ = self.vector_env.reset(seed=[int(seed) for seed in seeds])
        self.stats.returns[:] = 0.0
        self.stats.lengths[:] = 0

    def _check_thoughts(self, completions: list[Completion | None], policy_config: Any) -> np.ndarray:
        # Checked before the env steps: the thoughts are about the state the observation showed.
        result = np.full(self.num_envs, np.nan)
        if getattr(policy_config, "prompt_style", None) != "cot":
            return result
        for index, (checker, completion) in enumerate(zip(self.thought_checkers, completions)):
            if checker is not None and completion is not None:
                thoughts = extract_thoughts(completion.text)
                result[index] = float(thoughts is not None and bool(checker(thoughts)))
        return result

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (arrays, numbers, strings) that :meth:`load_state_dict` turns back into this runner."""
        return {
            "env_id": self.env_id,
            "num_envs": self.num_envs,
            "steps": self.steps,
            "observations": copy.deepcopy(self.observations),
            "episode_returns": self.stats.returns.copy(),
            "episode_lengths": self.stats.lengths.copy(),
            "episodes": [copy.deepcopy(env.episode) for env in self.vector_env.envs],
            "recorder": self.recorder.state_dict() if self.recorder is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the runner by replaying each env's current episode.

        When an env does not come back to the observation it showed when the state was saved (an env
        with randomness outside ``np_random``, say), training goes on from the replayed state, with a
        warning that names the env: the run continues, but not bit for bit.
        """
        if state["env_id"] != self.env_id or state["num_envs"] != self.num_envs:
            raise ValueError(
                f"The saved runner ran {state['num_envs']} x {state['env_id']}, not {self.num_envs} x {self.env_id}."
            )
        self.steps = state["steps"]
        self.stats.returns = state["episode_returns"].copy()
        self.stats.lengths = state["episode_lengths"].copy()
        self.observations = copy.deepcopy(state["observations"])
        if self.recorder is not None and state.get("recorder") is not None:
            self.recorder.load_state_dict(state["recorder"])
        differing = []
        for index, (env, episode) in enumerate(zip(self.vector_env.envs, state["episodes"])):
            replayed = env.replay(episode)
            saved = {key: value[index] for key, value in self.observations.items()}
            if not _same_observation(replayed, saved):
                differing.append(env.name)
                _set_observation(self.observations, index, replayed)
        if differing:
            warnings.warn(
                f"{', '.join(differing)}: replaying the saved episode did not reproduce the saved observation "
                "(the env draws randomness outside its np_random, or is not deterministic). Training goes on "
                "from the replayed state; this resume is not exact.",
                stacklevel=2,
            )

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.writer.close()
        self.vector_env.close()


def _take(batch: dict[str, Any], indices: np.ndarray) -> dict[str, Any]:
    """The observations of the envs at ``indices`` from a vector env's batch."""
    if len(indices) == len(next(iter(batch.values()))):
        return batch
    return {
        key: value[indices] if isinstance(value, np.ndarray) else type(value)(value[i] for i in indices)
        for key, value in batch.items()
    }


def _same_observation(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_observation(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _set_observation(batch: dict[str, Any], index: int, observation: dict[str, Any]) -> None:
    for key, value in observation.items():
        if isinstance(batch[key], np.ndarray):
            batch[key][index] = value
        else:  # text observations come as a tuple
            items = list(batch[key])
            items[index] = value
            batch[key] = type(batch[key])(items)
