"""Episodes on disk: a Hugging Face ``datasets`` dataset with one row per step, written crash-safely.

A store is a directory::

    PATH/store.json                   format name and schema version (written once)
    PATH/store.lock                   held (fcntl.flock) by the one writer that may append
    PATH/shards/shard-000000.parquet  whole episodes, about ``shard_size`` steps per shard
    PATH/shards/shard-000001.parquet  ...

Each shard is written under a temporary name in the same directory, flushed to disk and renamed into
place, so a writer that is killed loses at most the episodes it had not yet written, never an earlier
shard; a half-written temporary file never matches ``shard-*.parquet``. An episode never spans two shards.

Write with :class:`TrajectoryWriter` (or :func:`collect_expert`), read with :func:`load_trajectories`, and
pick rows with :func:`successes`, :func:`top_fraction`, :func:`from_source` and :func:`episodes`. The
shards are plain parquet files with the ``datasets`` features in their metadata, so
``datasets.load_dataset("parquet", data_files="PATH/shards/*.parquet", split="train")`` loads a store too
(memory-mapped through the ``datasets`` cache, without the checks of :func:`load_trajectories`).

Columns (:data:`COLUMNS`), one row per step:

* ``episode_id`` (unique per episode), ``env_id``, ``env_options`` (JSON of the env's keyword arguments),
  ``seed`` (the episode's reset seed, -1 if unknown), ``step`` (0-based index within the episode);
* ``image`` (a ``datasets.Image``: PNG bytes, decodes to the uint8 (H, W, 3) observation image),
  ``step_text`` (the observation's text), ``prompt_style`` (``"cot"`` or ``"action"``), ``prompt`` (the
  task text ``envs.build_prompt(spec, step_text, prompt_style)``, not the model's chat template: the
  policy wraps it in that template together with the image);
* ``answer`` (the answer text), ``thoughts`` (its reasoning, or None), ``action_name`` (or None),
  ``action`` (the parsed action index, -1 for an invalid answer), ``valid``, ``invalid_reason`` (or None);
* ``reward`` (the step's total reward), ``reward_parts`` (JSON of ``{name: reward}``, summing to
  ``reward``), ``terminated``, ``truncated``, ``return_to_go`` (undiscounted sum of the rewards from this
  step to the end of the episode; discount it yourself if you need to), ``episode_return``,
  ``episode_length``, ``success`` (of the episode);
* ``source`` (``"expert"``, a checkpoint path, or ``"run:<run dir>@update-<n>"``) and ``logprob`` (the
  policy's sequence log-prob of the answer when a policy wrote it, else None);
* ``continuous_action`` (schema version 2): the continuous action the env was stepped with
  (``step_continuous``, e.g. Reach's and Push's end-effector displacement), else None. In such a row
  ``action``, ``action_name`` and ``answer`` hold the discrete expert's choice at the same state
  (``vlmrl collect --expert --continuous``); in an action-head policy's episodes (``agents/vla.py``) the
  answer is the vector written out, ``action`` is -1, ``valid`` False and ``invalid_reason``
  :data:`CONTINUOUS_REASON`: the step named no discrete action.

Stores of schema version 1 (without ``continuous_action``) load as they are, the column read as None, and a
writer that appends to one marks it version 2.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

#: Version of the row schema below; bump it when a column is added, removed or changes meaning.
SCHEMA_VERSION = 2
#: Versions :func:`load_trajectories` reads: version 1 lacks ``continuous_action`` (read as None).
READABLE_SCHEMA_VERSIONS = (1, 2)
#: ``invalid_reason`` of a step whose action was continuous (an action head's): it names no discrete action.
CONTINUOUS_REASON = "continuous action (see continuous_action)"
STORE_FORMAT = "vlmrl-trajectories"
STORE_FILE = "store.json"
LOCK_FILE = "store.lock"
SHARD_DIR = "shards"
#: Steps per shard by default: a shard is the most a killed writer can lose.
DEFAULT_SHARD_SIZE = 1_000

_SHARD_NAME = re.compile(r"^shard-(\d{6,})\.parquet$")
_TEMP_SUFFIX = ".tmp"

FEATURES = datasets.Features(
    {
        "episode_id": datasets.Value("string"),
        "env_id": datasets.Value("string"),
        "env_options": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "step": datasets.Value("int64"),
        "image": datasets.Image(),
        "step_text": datasets.Value("string"),
        "prompt_style": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "thoughts": datasets.Value("string"),
        "action_name": datasets.Value("string"),
        "action": datasets.Value("int64"),
        "valid": datasets.Value("bool"),
        "invalid_reason": datasets.Value("string"),
        "reward": datasets.Value("float64"),
        "reward_parts": datasets.Value("string"),
        "terminated": datasets.Value("bool"),
        "truncated": datasets.Value("bool"),
        "return_to_go": datasets.Value("float64"),
        "episode_return": datasets.Value("float64"),
        "episode_length": datasets.Value("int64"),
        "success": datasets.Value("bool"),
        "source": datasets.Value("string"),
        "logprob": datasets.Value("float64"),
        "continuous_action": datasets.Sequence(datasets.Value("float32")),
    }
)
#: Every column of a store, in order.
COLUMNS: tuple[str, ...] = tuple(FEATURES)


# ----------------------------------------------------------------------------------------------------------
# Steps and episodes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One step as the collector saw it, before the episode is over.

    The prompt is not stored here: :func:`episode_rows` builds it from the environment's language spec,
    so the stored prompt is always the one the spec gives for ``step_text``.
    """

    image: np.ndarray
    """The observation image the answer was given for, uint8 (H, W, 3)."""
    step_text: str
    """The observation's text."""
    answer: str
    """The answer text."""
    action: int
    """The parsed action index, -1 when the answer is invalid."""
    reward: float
    """The step's total reward."""
    terminated: bool
    """The environment ended the episode at this step."""
    truncated: bool
    """A time limit cut the episode at this step."""
    thoughts: str | None = None
    """The answer's reasoning (chain-of-thought style), else None."""
    action_name: str | None = None
    """The name of ``action`` (None when invalid)."""
    invalid_reason: str | None = None
    """Why the answer is invalid (``envs.parse_action``'s reason); None when it is valid."""
    reward_parts: dict[str, float] | None = None
    """Named terms that sum to ``reward``; None means ``{"env": reward}``."""
    logprob: float | None = None
    """The policy's sequence log-prob of the answer, when a policy wrote it."""
    success: bool = False
    """``info["success"]`` after this step; the last step's value is the episode's success."""
    continuous_action: list[float] | None = None
    """The continuous action the env was stepped with (``step_continuous``), else None."""


def new_episode_id(env_id: str, seed: int) -> str:
    """A fresh episode id: the env's short name, the seed and 12 random hex digits (48 bits).

    >>> new_episode_id("vlmrl/GridWorld-v0", 7).startswith("GridWorld-v0-7-")
    True
    """
    return f"{env_id.rsplit('/', 1)[-1]}-{seed}-{uuid.uuid4().hex[:12]}"


def episode_rows(
    steps: Sequence[StepRecord],
    *,
    env_id: str,
    seed: int,
    prompt_style: str,
    source: str,
    env_options: dict[str, Any] | None = None,
    episode_id: str | None = None,
    success: bool | None = None,
) -> list[dict[str, Any]]:
    """The rows of one finished episode, with ``return_to_go``, the episode's return, length and success.

    Args:
        steps: The episode's steps in order; the last one must end the episode (terminated or truncated)
            and no earlier one may.
        env_id: The registered environment id; it must have a language spec (``envs.get_language``).
        seed: The seed the episode was reset with (-1 if unknown).
        prompt_style: ``"cot"`` or ``"action"``: the prompt the answers were given for.
        source: Who answered: ``"expert"``, a checkpoint path, or ``"run:<run dir>@update-<n>"``.
        env_options: The keyword arguments the environment was made with (stored as JSON).
        episode_id: A unique id; a fresh one (:func:`new_episode_id`) by default.
        success: The episode's success; by default the last step's ``success`` (``info["success"]``).

    >>> image = np.zeros((4, 4, 3), dtype=np.uint8)
    >>> steps = [StepRecord(image, "", "up", 0, r, t, False, action_name="up") for r, t in [(0.5, False), (1.0, True)]]
    >>> rows = episode_rows(steps, env_id="vlmrl/GridWorld-v0", seed=3, prompt_style="action", source="expert")
    >>> [row["return_to_go"] for row in rows], rows[0]["episode_return"], rows[0]["episode_length"]
    ([1.5, 1.0], 1.5, 2)
    """
    from envs import build_prompt, get_language
    from envs.language import PROMPT_STYLES

    if not steps:
        raise ValueError("An episode needs at least one step.")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {prompt_style!r}; use one of {PROMPT_STYLES}.")
    if not source:
        raise ValueError('source is empty: say who answered ("expert", a checkpoint path, "run:<dir>@update-<n>").')
    spec = get_language(env_id)
    for index, step in enumerate(steps[:-1]):
        if step.terminated or step.truncated:
            raise ValueError(
                f"Step {index} of {len(steps)} ends the episode (terminated or truncated) but is not the last; "
                "pass one episode at a time."
            )
    if not (steps[-1].terminated or steps[-1].truncated):
        raise ValueError(
            "The last step neither terminates nor truncates the episode: store whole episodes only "
            "(drop an episode that was still running when collection stopped)."
        )
    try:
        options_json = json.dumps(env_options or {}, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"env_options must be JSON-serialisable keyword arguments: {error}") from None

    rewards = [float(step.reward) for step in steps]
    return_to_go = np.cumsum(rewards[::-1])[::-1].tolist()
    episode_id = episode_id or new_episode_id(env_id, seed)
    episode_success = bool(steps[-1].success if success is None else success)
    rows = []
    for index, step in enumerate(steps):
        _check_step(step, index, spec.action_names)
        parts = {"env": float(step.reward)} if step.reward_parts is None else step.reward_parts
        rows.append(
            {
                "episode_id": episode_id,
                "env_id": env_id,
                "env_options": options_json,
                "seed": int(seed),
                "step": index,
                "image": step.image,
                "step_text": step.step_text,
                "prompt_style": prompt_style,
                "prompt": build_prompt(spec, step.step_text, prompt_style),
                "answer": step.answer,
                "thoughts": step.thoughts,
                "action_name": step.action_name,
                "action": int(step.action),
                "valid": bool(step.action >= 0),
                "invalid_reason": step.invalid_reason,
                "reward": float(step.reward),
                "reward_parts": json.dumps({name: float(value) for name, value in parts.items()}),
                "terminated": bool(step.terminated),
                "truncated": bool(step.truncated),
                "return_to_go": float(return_to_go[index]),
                "episode_return": float(return_to_go[0]),
                "episode_length": len(steps),
                "success": episode_success,
                "source": source,
                "logprob": None if step.logprob is None else float(step.logprob),
                "continuous_action": None
                if step.continuous_action is None
                else [float(value) for value in np.asarray(step.continuous_action, dtype=np.float32).ravel()],
            }
        )
    return rows


def _check_step(step: StepRecord, index: int, action_names: tuple[str, ...]) -> None:
    where = f"Step {index}"
    image = step.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{where}: image must be a uint8 array of shape (H, W, 3), got {got}.")
    if not -1 <= step.action < len(action_names):
        raise ValueError(f"{where}: action {step.action} is outside [-1, {len(action_names)}) (-1 = invalid).")
    if step.action >= 0:
        if step.invalid_reason is not None:
            raise ValueError(f"{where}: action {step.action} is valid but invalid_reason is set; use action=-1.")
        if step.action_name is not None and step.action_name != action_names[step.action]:
            raise ValueError(
                f"{where}: action_name {step.action_name!r} is not the name of action {step.action} "
                f"({action_names[step.action]!r})."
            )
    elif not step.invalid_reason:
        raise ValueError(f"{where}: action -1 (invalid) needs an invalid_reason saying why.")
    if step.continuous_action is not None and not np.all(np.isfinite(np.asarray(step.continuous_action, float))):
        raise ValueError(f"{where}: continuous_action {step.continuous_action} is not finite.")
    if not math.isfinite(step.reward):
        raise ValueError(f"{where}: reward {step.reward} is not finite.")
    if step.reward_parts is not None:
        total = sum(float(value) for value in step.reward_parts.values())
        if not math.isclose(total, step.reward, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"{where}: reward_parts {step.reward_parts} sum to {total}, not to the reward {step.reward}."
            )


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _shard_files(root: Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every shard of a store, in shard order; temporary files are not shards."""
    shard_dir = root / SHARD_DIR
    if not shard_dir.is_dir():
        return []
    found = []
    for entry in shard_dir.iterdir():
        match = _SHARD_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _read_store_file(root: Path) -> dict[str, Any]:
    try:
        info = json.loads((root / STORE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{root / STORE_FILE} cannot be read ({error}); is {root} a trajectory store?") from None
    if info.get("format") != STORE_FORMAT:
        raise ValueError(f"{root} is not a trajectory store: {STORE_FILE} has format {info.get('format')!r}.")
    if info.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{root} holds schema version {info.get('schema_version')}, this code reads versions "
            f"{READABLE_SCHEMA_VERSIONS} and writes {SCHEMA_VERSION}; write a new store or convert this one."
        )
    return info


def _fsync_directory(directory: Path) -> None:
    # A rename is durable only once the directory entry itself is on disk.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(final: Path, write) -> None:
    """Write ``final`` through ``write(file)`` under a temporary name in the same directory, then rename."""
    temporary = final.with_name(f".{final.name}.{os.getpid()}{_TEMP_SUFFIX}")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, final)
    _fsync_directory(final.parent)


class TrajectoryWriter:
    """Append whole episodes to a store at ``path``, one shard every ``shard_size`` steps.

    Episodes are buffered; once ``shard_size`` or more steps are buffered they are written as one shard
    (so a shard holds whole episodes and may exceed ``shard_size`` by up to one episode). ``flush()``,
    ``close()`` and leaving a ``with`` block write what is buffered. A killed writer loses only its
    buffered episodes. Appending to an existing store continues its shard numbering; only one writer at
    a time may hold a store (``store.lock``), a second one fails at construction.

    >>> import tempfile
    >>> image = np.zeros((4, 4, 3), dtype=np.uint8)
    >>> with tempfile.TemporaryDirectory() as tmp, TrajectoryWriter(Path(tmp) / "store", shard_size=10) as writer:
    ...     episode_id = writer.add_episode([StepRecord(image, "", "up", 0, 1.0, True, False, action_name="up")],
    ...                                     env_id="vlmrl/GridWorld-v0", seed=0, prompt_style="action", source="expert")
    ...     writer.close()
    ...     len(load_trajectories(Path(tmp) / "store"))
    1
    """

    def __init__(self, path: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r}; use a positive number of steps per shard.")
        if not str(path):
            raise ValueError("No store path given.")
        self.path = Path(path)
        self.shard_size = shard_size
        self._buffer: list[dict[str, Any]] = []
        self._buffered_ids: set[str] = set()
        self._lock_file = None
        self.shards_written: list[Path] = []  # shards this writer wrote, in order
        self.steps_written = 0  # steps in those shards (buffered steps not included)
        self._open()

    def _open(self) -> None:
        root = self.path
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file; a trajectory store is a directory.")
        # A directory that holds nothing but a store's own entries may be a store another writer is creating.
        if (
            root.is_dir()
            and not (root / STORE_FILE).exists()
            and {e.name for e in root.iterdir()} - {SHARD_DIR, LOCK_FILE}
        ):
            raise ValueError(
                f"{root} is a non-empty directory that is not a trajectory store (no {STORE_FILE}); "
                "choose a new or empty directory, or an existing store to append to."
            )
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_file = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            self._lock_file = None
            raise RuntimeError(
                f"{root} is being written by another TrajectoryWriter (pid {holder}, holding {root / LOCK_FILE}); "
                "wait for it to close, or write to another directory."
            ) from None
        try:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            self._lock_file.write(f"{os.getpid()}\n")
            self._lock_file.flush()
            if (root / STORE_FILE).exists():
                info = _read_store_file(root)
                if info["schema_version"] != SCHEMA_VERSION:  # older shards stay readable (see load_trajectories)
                    info = {**info, "schema_version": SCHEMA_VERSION, "columns": list(COLUMNS)}
                    _write_atomically(root / STORE_FILE, lambda file: file.write(json.dumps(info, indent=2).encode()))
            else:
                info = {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "columns": list(COLUMNS)}
                _write_atomically(root / STORE_FILE, lambda file: file.write(json.dumps(info, indent=2).encode()))
            # Holding the lock, every temporary file left in shards/ belongs to a writer that died mid-write.
            for entry in (root / SHARD_DIR).iterdir():
                if entry.name.startswith(".shard-") and entry.name.endswith(_TEMP_SUFFIX):
                    entry.unlink()
            existing = _shard_files(root)
            self._next_index = existing[-1][0] + 1 if existing else 0
        except BaseException:
            self._lock_file.close()  # releases the lock
            self._lock_file = None
            raise

    def add_episode(
        self,
        steps: Sequence[StepRecord],
        *,
        env_id: str,
        seed: int,
        prompt_style: str,
        source: str,
        env_options: dict[str, Any] | None = None,
        episode_id: str | None = None,
        success: bool | None = None,
    ) -> str:
        """Buffer one finished episode (arguments as in :func:`episode_rows`); return its episode id.

        Writes a shard when ``shard_size`` or more steps are buffered.
        """
        if self._lock_file is None:
            raise ValueError(f"This TrajectoryWriter for {self.path} is closed; open a new one to append.")
        rows = episode_rows(
            steps,
            env_id=env_id,
            seed=seed,
            prompt_style=prompt_style,
            source=source,
            env_options=env_options,
            episode_id=episode_id,
            success=success,
        )
        episode_id = rows[0]["episode_id"]
        if episode_id in self._buffered_ids:
            raise ValueError(f"Episode id {episode_id!r} was already added; episode ids must be unique.")
        self._buffered_ids.add(episode_id)
        self._buffer.extend(rows)
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return episode_id

    def flush(self) -> Path | None:
        """Write the buffered episodes as one shard now; return its path (None if nothing was buffered)."""
        if not self._buffer:
            return None
        table = datasets.Dataset.from_list(self._buffer, features=FEATURES).data.table
        final = self.path / SHARD_DIR / f"shard-{self._next_index:06d}.parquet"
        if final.exists():
            raise RuntimeError(f"{final} already exists; was the store written without its lock?")
        _write_atomically(final, lambda file: pq.write_table(table, file))
        self._next_index += 1
        self.steps_written += len(self._buffer)
        self.shards_written.append(final)
        self._buffer = []
        return final

    def shard_count(self) -> int:
        """Shards in the store now (written by any writer)."""
        return self._next_index

    def truncate(self, shards: int) -> None:
        """Drop the buffer and every shard from index ``shards`` on: a resumed run cuts its store back to
        its checkpoint, so the episodes it plays again are not stored twice."""
        self._buffer, self._buffered_ids = [], set()
        for index, path in _shard_files(self.path):
            if index >= shards:
                path.unlink()
        self._next_index = shards

    def close(self) -> None:
        """Write what is buffered and release the store. Closing twice is harmless."""
        if self._lock_file is None:
            return
        try:
            self.flush()
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        # Buffered episodes are whole and valid even when the block failed, so they are written too.
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _upgrade_shard(table: pa.Table) -> pa.Table:
    """A shard of schema version 1 (no ``continuous_action``) with that column added as nulls."""
    if "continuous_action" in table.schema.names or table.schema.names != list(COLUMNS[:-1]):
        return table
    column_type = FEATURES.arrow_schema.field("continuous_action").type
    return table.append_column("continuous_action", pa.nulls(table.num_rows, type=column_type))


def load_trajectories(path: str | os.PathLike, skip_bad_shards: bool = False) -> datasets.Dataset:
    """Every step of the store at ``path`` as one ``datasets.Dataset``, in shard order.

    The shards are read into memory (images stay PNG bytes until a row is accessed). A shard that cannot
    be read (cut short, corrupt, another schema) raises a ``ValueError`` that names it, unless
    ``skip_bad_shards`` is True: then it is left out with a warning that names it.
    """
    if not str(path):
        raise ValueError("No store path given.")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"No trajectory store at {root}: it does not exist.")
    if not root.is_dir() or not (root / STORE_FILE).is_file():
        raise ValueError(
            f"{root} is not a trajectory store (no {STORE_FILE}); make one with TrajectoryWriter or `vlmrl collect`."
        )
    _read_store_file(root)
    expected = FEATURES.arrow_schema
    tables = []
    for _, shard in _shard_files(root):
        try:
            table = _upgrade_shard(pq.read_table(shard))
            if not table.schema.equals(expected, check_metadata=False):
                raise ValueError(f"its columns {table.schema.names} are not the store's {list(COLUMNS)}")
        except (pa.ArrowException, OSError, ValueError) as error:
            if not skip_bad_shards:
                raise ValueError(
                    f"Shard {shard} cannot be read ({error}). Pass skip_bad_shards=True (--skip-bad-shards on "
                    "the command line) to load the other shards without it."
                ) from error
            warnings.warn(f"Skipping unreadable shard {shard}: {error}", stacklevel=2)
            continue
        tables.append(table.replace_schema_metadata(expected.metadata))
    if not tables or sum(table.num_rows for table in tables) == 0:
        raise ValueError(f"The trajectory store {root} holds no steps yet.")
    return datasets.Dataset(InMemoryTable(pa.concat_tables(tables)))


# ----------------------------------------------------------------------------------------------------------
# Selecting
# ----------------------------------------------------------------------------------------------------------


def check_store(
    dataset: datasets.Dataset,
    env_id: str | None = None,
    required_columns: Sequence[str] = COLUMNS,
    env_kwargs: dict[str, Any] | None = None,
) -> None:
    """Raise a ``ValueError`` that says what is wrong unless ``dataset`` is a non-empty set of store rows
    with ``required_columns`` and, when ``env_id`` is given, only that environment's steps, and, when
    ``env_kwargs`` is given, only steps played with those env options (a policy trained on other options
    would see other prompts and images than it will act on)."""
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"Got a DatasetDict with splits {list(dataset)}; pass one split (load_dataset(..., split='train'))."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"Expected a datasets.Dataset of store rows, got {type(dataset).__name__}.")
    missing = [column for column in required_columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks the columns {missing} (it has {dataset.column_names}); is it a trajectory store?"
        )
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows.")
    if env_id is not None:
        if "env_id" not in dataset.column_names:
            raise ValueError("The dataset has no env_id column, so its environment cannot be checked.")
        found = sorted(set(_column(dataset, "env_id")))
        if found != [env_id]:
            raise ValueError(f"The dataset holds steps of {found}, not only of {env_id!r}.")
    if env_kwargs is not None:
        options = {json.dumps(json.loads(o or "{}"), sort_keys=True) for o in dataset.unique("env_options")}
        wanted = json.dumps(env_kwargs, sort_keys=True)
        if options != {wanted}:
            raise ValueError(
                f"The dataset was collected with env options {sorted(options)}, not this run's {wanted}: collect "
                "with the experiment's options, or pass the same env options here."
            )


def _column(dataset: datasets.Dataset, name: str) -> list:
    """One column as a Python list, without decoding images (respects an earlier ``select``)."""
    return dataset.select_columns([name]).with_format("arrow")[:][name].to_pylist()


def _episode_indices(dataset: datasets.Dataset) -> dict[str, list[int]]:
    """Row indices per episode id, episodes in order of first appearance, rows ordered by step."""
    check_store(dataset, required_columns=("episode_id", "step"))
    groups: dict[str, list[tuple[int, int]]] = {}
    for row, (episode_id, step) in enumerate(zip(_column(dataset, "episode_id"), _column(dataset, "step"))):
        groups.setdefault(episode_id, []).append((step, row))
    return {episode_id: [row for _, row in sorted(pairs)] for episode_id, pairs in groups.items()}


def episodes(dataset: datasets.Dataset) -> list[datasets.Dataset]:
    """The dataset's episodes, each a ``Dataset`` of its rows ordered by step, in order of first appearance.

    Each episode is a ``select`` of the rows (no copy; about a millisecond each).
    """
    return [dataset.select(rows) for rows in _episode_indices(dataset).values()]


def successes(dataset: datasets.Dataset) -> datasets.Dataset:
    """The rows of successful episodes; a ``ValueError`` if there are none."""
    check_store(dataset, required_columns=("episode_id", "success"))
    flags = _column(dataset, "success")
    rows = [index for index, flag in enumerate(flags) if flag]
    if not rows:
        count = len(set(_column(dataset, "episode_id")))
        raise ValueError(f"None of the {count} episodes in the dataset succeeded; there is nothing to select.")
    return dataset.select(rows)


def top_fraction(dataset: datasets.Dataset, fraction: float) -> datasets.Dataset:
    """The rows of the ``ceil(fraction * episodes)`` episodes with the highest ``episode_return``.

    Whole episodes are kept; among equal returns the episode that appears first wins, so the result is
    deterministic and has exactly that many episodes. Rows keep their order in ``dataset``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r}; use a number in (0, 1], e.g. 0.1 for the best tenth.")
    check_store(dataset, required_columns=("episode_id", "episode_return"))
    first_row: dict[str, int] = {}
    episode_return: dict[str, float] = {}
    for row, (episode_id, value) in enumerate(zip(_column(dataset, "episode_id"), _column(dataset, "episode_return"))):
        first_row.setdefault(episode_id, row)
        episode_return[episode_id] = value
    keep_count = max(1, math.ceil(fraction * len(first_row) - 1e-9))
    ranked = sorted(first_row, key=lambda episode_id: (-episode_return[episode_id], first_row[episode_id]))
    kept = set(ranked[:keep_count])
    return dataset.select([row for row, episode_id in enumerate(_column(dataset, "episode_id")) if episode_id in kept])


def from_source(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """The rows written by ``source`` (``"expert"``, a checkpoint path, ...); a ``ValueError`` if none."""
    check_store(dataset, required_columns=("source",))
    sources = _column(dataset, "source")
    rows = [index for index, value in enumerate(sources) if value == source]
    if not rows:
        raise ValueError(f"No rows from source {source!r}; the dataset's sources are {sorted(set(sources))}.")
    return dataset.select(rows)


# ----------------------------------------------------------------------------------------------------------
# Expert collection
# ----------------------------------------------------------------------------------------------------------


def collect_expert(
    env_id: str,
    path: str | os.PathLike,
    *,
    episodes: int,
    env_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    prompt_style: str = "cot",
    shard_size: int = DEFAULT_SHARD_SIZE,
    continuous: bool = False,
) -> dict[str, Any]:
    """Play ``episodes`` episodes (seeds ``seed .. seed + episodes - 1``) with the environment's scripted
    expert and append them to the store at ``path`` with ``source="expert"``.

    ``continuous``: step the env with its continuous expert (``expert_continuous_action`` through
    ``step_continuous``, e.g. Reach and Push) and store that action in ``continuous_action``; ``action`` and
    the answer then hold the discrete expert's choice at the same state. The env's registered
    ``max_episode_steps`` still applies (:func:`agents.rollout.continuous_env`).

    The answer is ``envs.format_answer(name, thoughts=expert_rationale(), style="cot")`` for the ``"cot"``
    style (the rationale is taken before the step) and the bare action name for ``"action"``. Returns
    ``{"path", "episodes", "steps", "success_rate", "mean_return", "seconds", "steps_per_s"}``.
    """
    import gymnasium as gym

    from envs import format_answer, get_language
    from envs.language import PROMPT_STYLES

    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes={episodes!r}; collect at least one episode.")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {prompt_style!r}; use one of {PROMPT_STYLES}.")
    spec = get_language(env_id)
    env_kwargs = dict(env_kwargs or {})
    env = gym.make(env_id, **env_kwargs)
    if not callable(getattr(env.unwrapped, "expert_action", None)):
        env.close()
        raise ValueError(f"{env_id} has no scripted expert (env.unwrapped.expert_action); nothing to collect.")
    if continuous and not has_continuous_actions(env):
        env.close()
        raise ValueError(
            f"{env_id} has no continuous action space with an expert for it (env.unwrapped.continuous_action_space, "
            "step_continuous and expert_continuous_action); collect without --continuous."
        )
    if continuous:
        from agents.rollout import continuous_env

        env = continuous_env(env)  # expert vectors through step_continuous, under the registered time limit
    start = time.perf_counter()
    successes_seen, returns, total_steps = [], [], 0
    with TrajectoryWriter(path, shard_size=shard_size) as writer:
        for episode_seed in range(seed, seed + episodes):
            observation, info = env.reset(seed=episode_seed)
            steps: list[StepRecord] = []
            done = False
            while not done:
                action = int(env.unwrapped.expert_action())
                name = spec.action_names[action]
                thoughts = env.unwrapped.expert_rationale() if prompt_style == "cot" else None
                answer = format_answer(name, thoughts=thoughts, style=prompt_style)
                image, text = np.array(observation["image"], copy=True), observation["text"]
                if continuous:
                    continuous_action = np.asarray(env.unwrapped.expert_continuous_action(), dtype=np.float32)
                    observation, reward, terminated, truncated, info = env.step(continuous_action)
                else:
                    continuous_action = None
                    observation, reward, terminated, truncated, info = env.step(action)
                done = bool(terminated or truncated)
                steps.append(
                    StepRecord(
                        image=image,
                        step_text=text,
                        answer=answer,
                        action=action,
                        reward=float(reward),
                        terminated=bool(terminated),
                        truncated=bool(truncated),
                        thoughts=thoughts,
                        action_name=name,
                        success=bool(info.get("success", False)),
                        continuous_action=None if continuous_action is None else continuous_action.tolist(),
                    )
                )
            writer.add_episode(
                steps,
                env_id=env_id,
                seed=episode_seed,
                prompt_style=prompt_style,
                source="expert",
                env_options=env_kwargs,
            )
            successes_seen.append(steps[-1].success)
            returns.append(sum(step.reward for step in steps))
            total_steps += len(steps)
    env.close()
    seconds = time.perf_counter() - start
    return {
        "path": str(path),
        "episodes": episodes,
        "steps": total_steps,
        "success_rate": float(np.mean(successes_seen)),
        "mean_return": float(np.mean(returns)),
        "seconds": round(seconds, 3),
        "steps_per_s": round(total_steps / seconds, 1),
    }


def has_continuous_actions(env: Any) -> bool:
    """Whether an env (or its wrapper) offers continuous actions with a scripted expert for them:
    ``continuous_action_space``, ``step_continuous`` and ``expert_continuous_action`` on ``env.unwrapped``."""
    inner = getattr(env, "unwrapped", env)
    return all(
        hasattr(inner, name) for name in ("continuous_action_space", "step_continuous", "expert_continuous_action")
    )


__all__ = [
    "COLUMNS",
    "FEATURES",
    "SCHEMA_VERSION",
    "StepRecord",
    "TrajectoryWriter",
    "check_store",
    "collect_branches",
    "collect_expert",
    "episode_rows",
    "episodes",
    "from_source",
    "has_continuous_actions",
    "load_trajectories",
    "new_episode_id",
    "successes",
    "top_fraction",
]


# ----------------------------------------------------------------------------------------------------------
# Recording what a policy plays
# ----------------------------------------------------------------------------------------------------------


class EpisodeRecorder:
    """Store the episodes an :class:`~agents.rollout.EnvRunner` plays, each as it ends.

    Only whole episodes are stored: one already under way when recording began is left out (the episodes
    under way at a checkpoint travel in it, so a resumed run stores them whole). ``rewards`` are the env's own (``reward_parts={"env": r}``); an algorithm's extra terms
    (an invalid-answer penalty) are not part of the episode. The recorder's state (the number of shards
    at a checkpoint) travels in the runner's checkpoint: on resume the store is cut back to it, so no
    episode is stored twice.

    Args:
        writer: Where episodes go.
        env_id, env_options: The env and its keyword arguments.
        prompt_style: The policy's answer style (``"cot"`` answers have their thoughts stored).
        num_envs: Envs of the runner.
        source: The ``source`` column, or a function that gives it (a training run: its run and update).
        only_successes: Store only successful episodes.
        max_episodes: Stop storing after this many (the first to end; envs in index order on one step).
        seeds: Store only the episodes that start from one of these seeds.
    """

    def __init__(
        self,
        writer: TrajectoryWriter,
        env_id: str,
        env_options: dict[str, Any],
        prompt_style: str,
        num_envs: int,
        source: str | Any,
        only_successes: bool = False,
        max_episodes: int | None = None,
        seeds: set[int] | None = None,
    ) -> None:
        self.writer, self.env_id, self.env_options = writer, env_id, env_options
        self.wanted_seeds = seeds
        self.max_episodes = max_episodes
        self.successes: list[bool] = []
        self.returns: list[float] = []
        self.prompt_style, self.only_successes, self.source = prompt_style, only_successes, source
        self.open: list[list[StepRecord] | None] = [None] * num_envs
        self.seeds: list[int] = [-1] * num_envs
        self.episodes_written = 0

    def add(self, step: Any) -> None:
        """Record one :class:`~agents.rollout.RunnerStep`."""
        from envs.language import extract_thoughts

        finished = {episode["env"]: episode for episode in step.finished}
        for index, completion in enumerate(step.completions):
            if completion is None:  # this env did not step (a group rollout waiting for its round to end)
                continue
            if step.episode_steps[index] == 0:  # a new episode starts with this step
                seed = step.episode_seeds[index]
                wanted = self.wanted_seeds is None or seed in self.wanted_seeds
                self.open[index] = [] if wanted else None
                self.seeds[index] = -1 if seed is None else int(seed)
            records = self.open[index]
            if records is None:
                continue
            reward = float(step.rewards[index])
            # An action head's continuous action names no discrete action (see the module docstring).
            continuous = isinstance(completion.action, np.ndarray)
            discrete = None if completion.action is None or continuous else int(completion.action)
            records.append(
                StepRecord(
                    image=np.asarray(step.observations["image"][index]),
                    step_text=str(step.observations["text"][index]),
                    answer=completion.text,
                    action=-1 if discrete is None else discrete,
                    reward=reward,
                    terminated=bool(step.terminated[index]),
                    truncated=bool(step.truncated[index]),
                    thoughts=extract_thoughts(completion.text) if self.prompt_style == "cot" else None,
                    action_name=None if discrete is None else completion.action_names[discrete],
                    invalid_reason=CONTINUOUS_REASON if continuous else completion.reason if discrete is None else None,
                    reward_parts={"env": reward},
                    logprob=float(completion.logprob),
                    continuous_action=completion.action.tolist() if continuous else None,
                )
            )
            if index in finished:
                success = bool(finished[index]["success"])
                full = self.max_episodes is not None and self.episodes_written >= self.max_episodes
                if (success or not self.only_successes) and not full:
                    self.successes.append(success)
                    self.returns.append(float(finished[index]["return"]))
                    self.writer.add_episode(
                        records,
                        env_id=self.env_id,
                        seed=self.seeds[index],
                        prompt_style=self.prompt_style,
                        source=self.source() if callable(self.source) else self.source,
                        env_options=self.env_options,
                        success=success,
                    )
                    self.episodes_written += 1
                self.open[index] = None

    def state_dict(self) -> dict[str, Any]:
        """The shards written so far and the episodes under way (plain data), for a checkpoint."""
        import dataclasses

        self.writer.flush()
        return {
            "shards": self.writer.shard_count(),
            "open": [None if records is None else [dataclasses.asdict(r) for r in records] for records in self.open],
            "seeds": list(self.seeds),
            "episodes_written": self.episodes_written,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.writer.truncate(state["shards"])
        self.open = [None if records is None else [StepRecord(**r) for r in records] for records in state["open"]]
        self.seeds = list(state["seeds"])
        self.episodes_written = state["episodes_written"]


def _load_collecting_policy(source: str, device: str, prompt_style: str | None):
    """The policy that collects; ``prompt_style`` (if given) must be the saved policy's own, and sets a
    preset's."""
    from agents.policy import POLICY_FILE, load_policy

    saved = Path(source) / POLICY_FILE
    if prompt_style is not None and saved.exists():
        own = json.loads(saved.read_text())["config"]["prompt_style"]
        if own != prompt_style:
            raise ValueError(
                f"The policy at {source} was trained to write {own} answers; drop --prompt-style or pass "
                f"--prompt-style {own}."
            )
    options = {"device": device} if prompt_style is None else {"device": device, "prompt_style": prompt_style}
    return load_policy(source, **options)


def collect_policy(
    model: str,
    env_id: str,
    path: str | os.PathLike,
    *,
    episodes: int,
    env_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    greedy: bool = False,
    num_envs: int = 8,
    device: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    prompt_style: str | None = None,
) -> dict[str, Any]:
    """Play ``episodes`` episodes with a policy (``model``: a run directory, a policy directory or a preset)
    and append them to the store at ``path``, with ``source`` the resolved policy directory.

    Every episode starts from its own seed, and exactly the seeds ``seed .. seed + episodes - 1`` are stored
    (envs that reset after those are handed out play on, unstored, until the last wanted episode ends), so
    short episodes are not favoured. ``prompt_style`` sets a preset's answer style; for a saved policy it
    must be its own (or ``None``).
    """
    import itertools

    from agents.policy import resolve_policy_directory
    from agents.rollout import EnvRunner

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    source = resolve_policy_directory(model)
    policy = _load_collecting_policy(source, device, prompt_style)
    start = time.perf_counter()
    runner = EnvRunner(
        env_id,
        num_envs,
        env_kwargs,
        seed=seed,
        rng=np.random.default_rng(seed),
        episode_seeds=itertools.count(seed),
        continuous=bool(getattr(policy, "continuous", False)),  # an action head's vectors (agents/vla.py)
    )
    writer = TrajectoryWriter(path, shard_size=shard_size)
    runner.recorder = EpisodeRecorder(
        writer,
        env_id,
        env_kwargs or {},
        policy.config.prompt_style,
        num_envs,
        source=source,
        max_episodes=episodes,
        seeds=set(range(seed, seed + episodes)),
    )
    recorder = runner.recorder
    try:
        while recorder.episodes_written < episodes:
            runner.step(policy, greedy=greedy)
    finally:
        runner.close()
    return {
        "path": str(path),
        "source": source,
        "episodes": recorder.episodes_written,
        "success_rate": float(np.mean(recorder.successes)),
        "mean_return": float(np.mean(recorder.returns)),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ----------------------------------------------------------------------------------------------------------
# Branching from a policy's own episodes (step-level pairs)
# ----------------------------------------------------------------------------------------------------------


def _play_to_end(
    policy, environments: list, observations: list[dict], spec, rng: np.random.Generator
) -> list[tuple[list[StepRecord], list[int]]]:
    """Play each env from its observation to the end of its episode with one batched ``act`` per step;
    return, per env, its :class:`StepRecord` list and the env actions taken."""
    from agents.rollout import env_actions
    from envs.language import extract_thoughts

    records: list[list[StepRecord]] = [[] for _ in environments]
    taken: list[list[int]] = [[] for _ in environments]
    active = list(range(len(environments)))
    while active:
        answered = policy.act([observations[i] for i in active], spec)
        actions, _ = env_actions(answered, "default", 0, len(spec.action_names), rng)
        still = []
        for index, completion, action in zip(active, answered, actions):
            observation = observations[index]
            next_observation, reward, terminated, truncated, info = environments[index].step(int(action))
            valid = completion.action is not None
            records[index].append(
                StepRecord(
                    image=np.array(observation["image"], copy=True),
                    step_text=str(observation["text"]),
                    answer=completion.text,
                    action=int(completion.action) if valid else -1,
                    reward=float(reward),
                    terminated=bool(terminated),
                    truncated=bool(truncated),
                    thoughts=extract_thoughts(completion.text) if policy.config.prompt_style == "cot" else None,
                    action_name=spec.action_names[completion.action] if valid else None,
                    invalid_reason=None if valid else completion.reason,
                    logprob=float(completion.logprob),
                    success=bool(info.get("success", False)),
                )
            )
            taken[index].append(int(action))
            observations[index] = next_observation
            if not (terminated or truncated):
                still.append(index)
        active = still
    return [(steps, actions) for steps, actions in zip(records, taken)]


def collect_branches(
    model: str | Any,
    env_id: str,
    path: str | os.PathLike,
    *,
    episodes: int,
    branch: int,
    branch_steps: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    prompt_style: str | None = None,
) -> dict[str, Any]:
    """Per seed, one sampled episode of the policy and, from each of its first ``branch_steps`` steps
    (all by default), ``branch`` more episodes that repeat its steps up to there and answer that step anew
    (sampled), each played to its end: Monte Carlo rollouts from the same state, as IPR
    (https://arxiv.org/abs/2406.11176) and Agent Q estimate step values for step-level pairs.

    Every episode is stored whole with the seed's number (a branch's first steps are the main episode's),
    so ``vlmrl pairs --mode step`` compares the answers at each branching state by return-to-go and
    ``--mode trajectory`` finds each branch's divergence from its main episode. The env must be
    deterministic for a seed: a branch reaches its state by a reset with the seed and the main episode's
    env actions, and a ``ValueError`` names the step where it does not. Costs about
    ``branch * length**2 / 2`` env steps per seed.

    ``model``: a run directory, a policy directory, a preset, or a loaded policy. Invalid answers move the
    env with action 0 (as ``collect_policy``'s default rule). Returns a summary dict.
    """
    import gymnasium as gym

    from agents.policy import resolve_policy_directory
    from envs import get_language

    if episodes < 1 or branch < 1:
        raise ValueError(f"episodes={episodes} and branch={branch} must both be >= 1.")
    if branch_steps is not None and branch_steps < 1:
        raise ValueError(f"branch_steps={branch_steps}: branch from at least the first step (or pass None: all).")
    if isinstance(model, str):
        source = resolve_policy_directory(model)
        policy = _load_collecting_policy(source, device, prompt_style)
    else:
        policy, source = model, str(getattr(getattr(model, "config", None), "model", "policy"))
    if getattr(policy, "continuous", False):
        raise ValueError("Branching replays discrete actions; a continuous action-head policy cannot branch yet.")
    spec = get_language(env_id)
    env_kwargs = dict(env_kwargs or {})
    environments = [gym.make(env_id, **env_kwargs) for _ in range(branch)]
    main_env = gym.make(env_id, **env_kwargs)
    rng = np.random.default_rng(seed)
    start, stored, total_steps = time.perf_counter(), 0, 0
    try:
        with TrajectoryWriter(path, shard_size=shard_size) as writer:

            def store(steps: list[StepRecord], episode_seed: int) -> None:
                writer.add_episode(
                    steps, env_id=env_id, seed=episode_seed, prompt_style=policy.config.prompt_style,
                    source=source, env_options=env_kwargs,
                )  # fmt: skip

            for episode_seed in range(seed, seed + episodes):
                observation, _ = main_env.reset(seed=episode_seed)
                [(main, main_actions)] = _play_to_end(policy, [main_env], [observation], spec, rng)
                store(main, episode_seed)
                stored, total_steps = stored + 1, total_steps + len(main)
                for step in range(min(len(main), branch_steps or len(main))):
                    observations = []
                    for environment in environments:
                        observation, _ = environment.reset(seed=episode_seed)
                        for action in main_actions[:step]:
                            observation, *_ = environment.step(action)
                        if not (np.array_equal(observation["image"], main[step].image)
                                and observation["text"] == main[step].step_text):  # fmt: skip
                            raise ValueError(
                                f"{env_id} does not come back to step {step} of seed {episode_seed}'s episode when "
                                "reset with the seed and replayed: branching needs an env that is deterministic "
                                "for a seed."
                            )
                        observations.append(observation)
                    for steps, _ in _play_to_end(policy, environments, observations, spec, rng):
                        store(main[:step] + steps, episode_seed)
                        stored, total_steps = stored + 1, total_steps + len(steps)
    finally:
        for environment in [main_env, *environments]:
            environment.close()
    seconds = time.perf_counter() - start
    return {"path": str(path), "source": source, "seeds": episodes, "episodes": stored, "new_steps": total_steps,
            "seconds": round(seconds, 3)}  # fmt: skip
