"""Preference pairs from trajectory stores, saved in TRL's vision preference format.

A pair is one state (an image and a prompt) and two answers given to it, the ``chosen`` one labelled
better than the ``rejected`` one by a rule on what followed. Three builders read the store's rows
(``agents/trajectories.py``):

* :func:`trajectory_pairs` (ETO, Song et al. 2024, https://arxiv.org/abs/2403.02502): episodes of the same
  seed are compared by their return (or success); the better episode's answer is chosen at the first step
  where the two answered differently while still at the same state (``align="first"``), or at every step
  where both were at the same state and answered differently (``align="aligned"``).
* :func:`step_pairs` (IPR, Xiong et al. 2024, https://arxiv.org/abs/2406.11176; Agent Q, Putta et al. 2024,
  https://arxiv.org/abs/2408.07199): answers given at the same state (pixel-identical image, same text,
  same env and prompt) anywhere in the stores are ranked by their Monte Carlo value there, the mean
  return-to-go (or success) over the times each answer was given.
* :func:`expert_pairs`: at a state both the expert (``source == "expert"``) and a policy answered, the
  expert's answer is chosen.

Labels are never drawn at random: a tie (equal scores) gives no pair, a NaN score gives no pair, nor does
a difference smaller than ``min_margin``, nor two identical answers. Every pair records the rule that
labelled it (``label``: ``return``, ``success`` or ``expert``) and its scores.

A pair set is a ``datasets.Dataset`` saved with ``save_to_disk``; ``datasets.load_from_disk(PATH)`` gives
TRL's ``DPOTrainer`` its training set as it is. Columns (:data:`PAIR_FEATURES`):

* TRL's conversational vision preference format: ``images`` (a list of one image), ``prompt``
  (``[{"role": "user", "content": task text}]``; TRL's collator puts the image before the text and the
  model's chat template wraps it), ``chosen`` and ``rejected`` (``[{"role": "assistant", "content": answer}]``);
* what vlmrl needs to rebuild the observation and to check the pairs: ``env_id``, ``env_options``,
  ``prompt_style``, ``step_text``, ``seed``;
* provenance: ``mode``, ``label``, ``chosen_score``, ``rejected_score``, ``margin`` (their difference),
  ``chosen_episode_id``, ``rejected_episode_id``, ``chosen_step``, ``rejected_step``, ``chosen_source``,
  ``rejected_source``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

PAIRS_FORMAT = "vlmrl-pairs"
PAIRS_VERSION = 1
PAIRS_FILE = "pairs.json"
MODES = ("trajectory", "step", "expert")
LABELS = ("return", "success")

_MESSAGE = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
PAIR_FEATURES = datasets.Features(
    {
        "images": datasets.Sequence(datasets.Image()),
        "prompt": _MESSAGE,
        "chosen": _MESSAGE,
        "rejected": _MESSAGE,
        "env_id": datasets.Value("string"),
        "env_options": datasets.Value("string"),
        "prompt_style": datasets.Value("string"),
        "step_text": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "mode": datasets.Value("string"),
        "label": datasets.Value("string"),
        "chosen_score": datasets.Value("float64"),
        "rejected_score": datasets.Value("float64"),
        "margin": datasets.Value("float64"),
        "chosen_episode_id": datasets.Value("string"),
        "rejected_episode_id": datasets.Value("string"),
        "chosen_step": datasets.Value("int64"),
        "rejected_step": datasets.Value("int64"),
        "chosen_source": datasets.Value("string"),
        "rejected_source": datasets.Value("string"),
    }
)

# Store columns the builders read (the image is read separately, only for the states that matter).
_READ = (
    "episode_id",
    "env_id",
    "env_options",
    "seed",
    "step",
    "step_text",
    "prompt_style",
    "prompt",
    "answer",
    "action",
    "return_to_go",
    "episode_return",
    "success",
    "source",
)


# ----------------------------------------------------------------------------------------------------------
# Reading the store
# ----------------------------------------------------------------------------------------------------------


def _rows(dataset: datasets.Dataset) -> list[dict[str, Any]]:
    """The store's rows without decoding images, each with its row index and a state key.

    The state key hashes the image's PNG bytes decoded to pixels, the step text, the env, its options and
    the prompt style: two rows with equal keys showed the same thing to a policy that wrote the same prompt.
    """
    from agents.trajectories import check_store

    check_store(dataset, required_columns=(*_READ, "image"))
    table = dataset.select_columns(list(_READ)).with_format("arrow")[:]
    columns = {name: table[name].to_pylist() for name in _READ}
    # The images' PNG bytes in one Arrow read (indexing the dataset row by row is far slower).
    encoded = dataset.select_columns(["image"]).with_format("arrow")[:]["image"].combine_chunks().field("bytes")
    rows = []
    for index in range(len(dataset)):
        row = {name: columns[name][index] for name in _READ}
        row["row"] = index
        pixels = np.asarray(_decode(encoded[index].as_py()))
        digest = hashlib.sha1(np.ascontiguousarray(pixels).tobytes())
        digest.update(str(pixels.shape).encode())
        for part in (row["step_text"], row["env_id"], _canonical(row["env_options"]), row["prompt_style"]):
            digest.update(b"\0" + str(part).encode())
        row["state"] = digest.hexdigest()
        rows.append(row)
    return rows


def _decode(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _canonical(options: str) -> str:
    return json.dumps(json.loads(options or "{}"), sort_keys=True)


def _score(row: dict[str, Any], label: str, level: Literal["episode", "step"]) -> float:
    """The number a rule ranks by: return (the episode's, or the return-to-go from this step) or success."""
    if label == "success":
        return float(bool(row["success"])) if row["success"] is not None else math.nan
    value = row["episode_return"] if level == "episode" else row["return_to_go"]
    return math.nan if value is None else float(value)


def _better(first: float, second: float, min_margin: float) -> int:
    """+1 if ``first`` beats ``second`` by at least ``min_margin``, -1 the other way round, 0 for a tie, a
    difference below the margin or a NaN (never a label drawn at random)."""
    if math.isnan(first) or math.isnan(second) or first == second:
        return 0
    if abs(first - second) < min_margin:
        return 0
    return 1 if first > second else -1


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


class PairCounts(dict):
    """Why candidate pairs were kept or dropped (``kept``, ``ties``, ``nan``, ``below_margin``,
    ``same_answer``...), for the summary."""

    def add(self, key: str, count: int = 1) -> None:
        self[key] = self.get(key, 0) + count


def _pair(
    chosen: dict, rejected: dict, mode: str, label: str, chosen_score: float, rejected_score: float
) -> dict[str, Any]:
    return {
        "row": chosen["row"],  # where the image comes from (both rows show the same state)
        "prompt": [{"role": "user", "content": chosen["prompt"]}],
        "chosen": [{"role": "assistant", "content": chosen["answer"]}],
        "rejected": [{"role": "assistant", "content": rejected["answer"]}],
        "env_id": chosen["env_id"],
        "env_options": _canonical(chosen["env_options"]),
        "prompt_style": chosen["prompt_style"],
        "step_text": chosen["step_text"],
        "seed": int(chosen["seed"]),
        "mode": mode,
        "label": label,
        "chosen_score": float(chosen_score),
        "rejected_score": float(rejected_score),
        "margin": float(chosen_score - rejected_score),
        "chosen_episode_id": chosen["episode_id"],
        "rejected_episode_id": rejected["episode_id"],
        "chosen_step": int(chosen["step"]),
        "rejected_step": int(rejected["step"]),
        "chosen_source": chosen["source"],
        "rejected_source": rejected["source"],
    }


def _episodes(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["episode_id"], []).append(row)
    return {key: sorted(steps, key=lambda r: r["step"]) for key, steps in grouped.items()}


def trajectory_pairs(
    rows: list[dict],
    label: str = "return",
    min_margin: float = 0.0,
    align: Literal["first", "aligned"] = "first",
    counts: PairCounts | None = None,
) -> list[dict[str, Any]]:
    """ETO's contrastive trajectory pairs: every two episodes of one seed (same env, options and prompt
    style) whose ``label`` scores differ by at least ``min_margin``; the pair is taken where the episodes
    stand at the same state and answered differently (the first such step, or all of them before the
    states part)."""
    counts = PairCounts() if counts is None else counts
    groups: dict[tuple, list[list[dict]]] = {}
    for steps in _episodes(rows).values():
        first = steps[0]
        if first["seed"] is None or first["seed"] < 0:
            counts.add("unknown_seed")
            continue
        key = (first["env_id"], _canonical(first["env_options"]), first["prompt_style"], first["seed"])
        groups.setdefault(key, []).append(steps)
    pairs = []
    for episodes in groups.values():
        for one, other in itertools.combinations(episodes, 2):
            one_score, other_score = _score(one[0], label, "episode"), _score(other[0], label, "episode")
            order = _better(one_score, other_score, min_margin)
            if order == 0:
                counts.add("nan" if math.isnan(one_score) or math.isnan(other_score) else
                           "ties" if one_score == other_score else "below_margin")  # fmt: skip
                continue
            chosen, rejected = (one, other) if order > 0 else (other, one)
            chosen_score, rejected_score = max(one_score, other_score), min(one_score, other_score)
            found = 0
            for good, bad in zip(chosen, rejected):
                if good["state"] != bad["state"]:
                    break  # the episodes parted: later steps are answers to different states
                if good["answer"] == bad["answer"]:
                    continue
                pairs.append(_pair(good, bad, "trajectory", label, chosen_score, rejected_score))
                found += 1
                if align == "first":
                    break
            counts.add("kept" if found else "no_divergent_answer", max(found, 1))
    return pairs


def _mean_score(given: list[dict], label: str, counts: PairCounts) -> float:
    """The Monte Carlo value of rows that gave one answer (or move) at one state: their mean step score,
    NaN scores counted and left out (NaN if none is left)."""
    values = [_score(row, label, "step") for row in given]
    finite = [value for value in values if not math.isnan(value)]
    if len(finite) < len(values):
        counts.add("nan", len(values) - len(finite))
    return float(np.mean(finite)) if finite else math.nan


def step_pairs(
    rows: list[dict],
    label: str = "return",
    min_margin: float = 0.0,
    counts: PairCounts | None = None,
    per_state: Literal["all", "best-worst", "by-action"] = "all",
) -> list[dict[str, Any]]:
    """IPR / Agent Q step-level pairs: at each state seen more than once, every two different answers whose
    mean ``label`` score there (return-to-go, or the episode's success) differs by at least ``min_margin``.

    Averaging over the times an answer was given at the state makes it a Monte Carlo estimate of that
    answer's value and gives one consistent order (the same answer never ends up both chosen and rejected).

    ``per_state="best-worst"`` keeps one pair per state, its best answer over its worst (iterative DPO's
    choice, Xiong et al. 2024, https://arxiv.org/abs/2312.11456): a policy that words its answers in many
    ways gives ``K (K - 1) / 2`` pairs at a state answered ``K`` ways, mostly between near-equal answers.
    Among equally scored best (or worst) answers the first given is taken; the other candidate pairs are
    counted as ``not_extreme``.

    ``per_state="by-action"`` scores the parsed action instead of the answer text: all the wordings of one
    action at a state share one Monte Carlo value, the mean over every time that action was taken there.
    A policy that words its thoughts many ways gives almost every answer text one sample, so the per-answer
    mean is one noisy return-to-go; per action, the group's answers average out the randomness of what
    followed. The answers of the best action are paired with those of the worst, one to one, as many pairs
    as the smaller of the two has (each answer used once). Invalid answers (``action`` -1) keep their own
    text as their key.
    """
    if per_state not in ("all", "best-worst", "by-action"):
        raise ValueError(f"per_state must be 'all', 'best-worst' or 'by-action', got {per_state!r}.")
    counts = PairCounts() if counts is None else counts
    if per_state == "by-action":
        return _action_pairs(rows, label, min_margin, counts)
    states: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        states.setdefault(row["state"], {}).setdefault(row["answer"], []).append(row)
    pairs = []
    for answers in states.values():
        if len(answers) < 2:
            continue
        scored = [(_mean_score(given, label, counts), given[0]) for given in answers.values()]
        candidates = list(itertools.combinations(scored, 2))
        if per_state == "best-worst":
            ranked = [entry for entry in scored if not math.isnan(entry[0])]
            if len(ranked) >= 2:
                best = max(ranked, key=lambda entry: entry[0])  # max/min keep the first of equals
                worst = min(ranked, key=lambda entry: entry[0])
                counts.add("not_extreme", len(candidates) - 1)
                candidates = [(best, worst)]
        for (one_score, one), (other_score, other) in candidates:
            order = _better(one_score, other_score, min_margin)
            if order == 0:
                if not (math.isnan(one_score) or math.isnan(other_score)):
                    counts.add("ties" if one_score == other_score else "below_margin")
                continue
            chosen, rejected = (one, other) if order > 0 else (other, one)
            pairs.append(
                _pair(chosen, rejected, "step", label, max(one_score, other_score), min(one_score, other_score))
            )
            counts.add("kept")
    return pairs


def _action_pairs(rows: list[dict], label: str, min_margin: float, counts: PairCounts) -> list[dict[str, Any]]:
    """:func:`step_pairs` with ``per_state="by-action"``: best action's answers over the worst action's."""
    states: dict[str, dict[Any, list[dict]]] = {}
    for row in rows:
        action = row.get("action")
        key = ("action", int(action)) if action is not None and action >= 0 else ("answer", row["answer"])
        states.setdefault(row["state"], {}).setdefault(key, []).append(row)
    pairs = []
    for actions in states.values():
        scored = [(_mean_score(given, label, counts), given) for given in actions.values()]
        scored = [entry for entry in scored if not math.isnan(entry[0])]
        if len(scored) < 2:
            continue
        (best_score, best), (worst_score, worst) = max(scored, key=lambda e: e[0]), min(scored, key=lambda e: e[0])
        if _better(best_score, worst_score, min_margin) <= 0:
            counts.add("ties" if best_score == worst_score else "below_margin")
            continue
        counts.add("not_extreme", len(scored) * (len(scored) - 1) // 2 - 1)
        for chosen, rejected in zip(best, worst):
            if chosen["answer"] == rejected["answer"]:
                counts.add("same_answer")
                continue
            pairs.append(_pair(chosen, rejected, "step", label, best_score, worst_score))
            counts.add("kept")
    return pairs


def expert_pairs(rows: list[dict], min_margin: float = 0.0, counts: PairCounts | None = None) -> list[dict[str, Any]]:
    """At every state where the expert and a policy answered differently, the expert's answer is chosen.

    The scores are the two answers' returns-to-go, for the record; with ``min_margin > 0`` a pair is kept
    only when the expert's return-to-go beat the policy's by that much (a NaN then drops it).
    """
    counts = PairCounts() if counts is None else counts
    expert: dict[str, dict] = {}
    for row in rows:
        if row["source"] == "expert":
            expert.setdefault(row["state"], row)
    if not expert:
        raise ValueError('No expert steps (source "expert") in the stores; collect some with `vlmrl collect --expert`.')
    pairs, seen = [], set()
    for row in rows:
        if row["source"] == "expert":
            continue
        if row["state"] not in expert:
            counts.add("no_expert_state")
            continue
        good = expert[row["state"]]
        if good["answer"] == row["answer"]:
            counts.add("same_answer")
            continue
        if (row["state"], row["answer"]) in seen:
            counts.add("duplicate")
            continue
        good_score, bad_score = _score(good, "return", "step"), _score(row, "return", "step")
        if min_margin > 0 and _better(good_score, bad_score, min_margin) <= 0:
            counts.add("below_margin")
            continue
        seen.add((row["state"], row["answer"]))
        pairs.append(_pair(good, row, "expert", "expert", good_score, bad_score))
        counts.add("kept")
    return pairs


def build_pairs(
    stores: Sequence[datasets.Dataset | str | os.PathLike],
    mode: str = "trajectory",
    label: str = "return",
    min_margin: float = 0.0,
    align: Literal["first", "aligned"] = "first",
    per_state: Literal["all", "best-worst", "by-action"] = "all",
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Pairs from one or more stores (paths or loaded datasets) as a dataset with :data:`PAIR_FEATURES`,
    and the counts of kept and dropped candidates. Raises a ``ValueError`` that says why when no pair
    is found."""
    from agents.trajectories import load_trajectories

    if mode not in MODES:
        raise ValueError(f"Unknown pair mode {mode!r}; use one of {', '.join(MODES)}.")
    if label not in LABELS:
        raise ValueError(f"Unknown label rule {label!r}; use one of {', '.join(LABELS)}.")
    if not math.isfinite(min_margin) or min_margin < 0:
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin}.")
    if align not in ("first", "aligned"):
        raise ValueError(f"align must be 'first' or 'aligned', got {align!r}.")
    if not stores:
        raise ValueError("No store given; name at least one trajectory store.")
    loaded = [load_trajectories(s) if isinstance(s, (str, os.PathLike)) else s for s in stores]
    dataset = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    rows = _rows(dataset)
    counts = PairCounts()
    if mode == "trajectory":
        pairs = trajectory_pairs(rows, label, min_margin, align, counts)
    elif mode == "step":
        pairs = step_pairs(rows, label, min_margin, counts, per_state)
    else:
        pairs = expert_pairs(rows, min_margin, counts)
    if not pairs:
        hint = {
            "trajectory": "it needs several episodes per seed with different returns (collect the same seeds again)",
            "step": "it needs different answers at the same state (several episodes per seed, sampled answers)",
            "expert": "it needs policy steps at states the expert also saw (collect both with the same seeds, env "
            "options and --prompt-style)",
        }[mode]
        raise ValueError(f"No preference pair found in {len(rows)} steps ({dict(counts)}): for mode {mode}, {hint}.")
    images = dataset.select([pair.pop("row") for pair in pairs]).select_columns(["image"])
    for pair, image in zip(pairs, images):
        pair["images"] = [image["image"].convert("RGB")]
    return datasets.Dataset.from_list(pairs, features=PAIR_FEATURES), dict(counts)


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------


def save_pairs(pairs: datasets.Dataset, path: str | os.PathLike, summary: dict[str, Any] | None = None) -> Path:
    """Save a pair set to the new directory ``path`` (``datasets.load_from_disk`` reads it back)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not empty; choose a new directory for the pairs.")
    pairs.save_to_disk(str(path))
    info = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "pairs": len(pairs), **(summary or {})}
    (path / PAIRS_FILE).write_text(json.dumps(info, indent=2))
    return path


def load_pairs(path: str | os.PathLike) -> datasets.Dataset:
    """A pair set saved by :func:`save_pairs` (or any dataset directory with :data:`PAIR_FEATURES`' columns)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"No pair set at {path}: make one with `vlmrl pairs STORE --out {path}`.")
    state = path / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        raise ValueError(f"{path} holds no pairs; there is nothing to learn from.")  # datasets cannot load it
    try:
        pairs = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{path} is not a saved dataset ({error}); make one with `vlmrl pairs`.") from None
    if isinstance(pairs, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {list(pairs)}; save one split of pairs.")
    missing = [name for name in PAIR_FEATURES if name not in pairs.column_names]
    if missing:
        raise ValueError(f"{path} lacks the pair columns {missing}; is it a pair set made by `vlmrl pairs`?")
    return pairs


__all__ = [
    "MODES",
    "PAIR_FEATURES",
    "build_pairs",
    "expert_pairs",
    "load_pairs",
    "save_pairs",
    "step_pairs",
    "trajectory_pairs",
]
