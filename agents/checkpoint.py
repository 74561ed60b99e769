"""Atomic, verifiable checkpoints: ``<run dir>/checkpoints/update-000010/``.

A checkpoint directory holds the policy (:meth:`~agents.policy.VLMPolicy.save`), ``trainer.pt`` (optimizer,
scheduler, counters, RNG states, environment states) and ``manifest.json`` with the SHA-256 of every file.
It is written under a temporary name and renamed into place, so a crash mid-save never leaves a
half-written checkpoint under a real name; the manifest is what tells a complete checkpoint from a
damaged one when resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from agents.errors import VlmrlError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"
POLICY_DIR = "policy"


class CheckpointError(VlmrlError, RuntimeError):
    """No usable checkpoint: the message names the files that were tried and what was wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    update: int,
    policy,
    trainer_state: dict[str, Any],
    keep: int = 2,
    policy_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``update`` atomically and keep only the newest ``keep`` checkpoints.

    ``policy_state``: the policy's whole state dict when this process holds a shard of it (FSDP)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"update-{update:06d}"
    staging = root / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if policy_state is None:
        policy.save(staging / POLICY_DIR)
    else:
        policy.save(staging / POLICY_DIR, state_dict=policy_state)
    torch.save(trainer_state, staging / TRAINER_STATE)
    files = {str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"update": update, "files": files}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    # Only checkpoints older than the one just written are pruned: whatever else is there, the newest
    # ``keep`` of this run survive.
    older = [p for p in sorted(root.glob("update-*")) if p.name < final.name]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".staging-*"):  # a save interrupted by a crash
        shutil.rmtree(leftover, ignore_errors=True)
    return final


#: Checkpoints found intact in this process, keyed by their files' (name, size, mtime): start-up resolves a
#: saved policy once to check its answer style and again to load it, and a 7B checkpoint should be hashed
#: once. Any rewrite of a file changes its key, so a checkpoint changed since is hashed again.
_VERIFIED: set[tuple] = set()


def verify_checkpoint(directory: Path) -> str | None:
    """``None`` if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.exists():
        return f"{manifest_path} is missing (the checkpoint was not finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as error:
        return f"{manifest_path} is unreadable ({error})"
    paths = [Path(directory) / name for name in files]
    for path in paths:
        if not path.exists():
            return f"{path} is missing"
    stats = [(path.stat().st_size, path.stat().st_mtime_ns) for path in paths]
    key = (str(Path(directory).resolve()), manifest_path.stat().st_mtime_ns, *zip(files, stats))
    if key in _VERIFIED:
        return None
    for path, expected in zip(paths, files.values()):
        if _sha256(path) != expected:
            return f"{path} does not match its checksum (damaged or changed after saving)"
    _VERIFIED.add(key)
    return None


def peek_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of the newest intact checkpoint of ``path`` (a run or checkpoint directory), or ``{}``
    when it cannot be read: a best guess for the command line (which algorithm, which mode) before the run
    reads the checkpoint again, verifies it and reports what is wrong with it, warnings included."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = load_trainer_state(find_checkpoint(path))
    except Exception:  # noqa: BLE001 - see the docstring: the run itself reports every problem
        return {}
    return state if isinstance(state, dict) else {}


def find_checkpoint(path: str | Path, purpose: str = "Resuming") -> Path:
    """The newest intact checkpoint of a run directory (or ``path`` itself if it is a checkpoint).

    A damaged newest checkpoint is reported with a warning and the previous one is used.
    """
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("update-"):
        candidates = [path]
    else:
        candidates = sorted((path / "checkpoints").glob("update-*"), reverse=True)
    if not candidates:
        raise CheckpointError(f"No checkpoint under {path}/checkpoints: nothing to resume or evaluate.")
    problems = []
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            if problems:
                warnings.warn(
                    f"Skipped damaged checkpoint(s): {'; '.join(problems)}. {purpose} from {candidate}.",
                    stacklevel=2,
                )
            return candidate
        problems.append(problem)
    raise CheckpointError(f"No intact checkpoint under {path}: " + "; ".join(problems))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint: plain data (config dict, counters, optimizer, RNG and env-runner
    states). Our own file, verified by its checksum: ``weights_only=False`` only for the RNG states' types."""
    try:
        return torch.load(Path(checkpoint) / TRAINER_STATE, weights_only=False)
    except (AttributeError, ModuleNotFoundError) as error:
        # Checkpoints of format 1 pickled the config class; a renamed class cannot be unpickled.
        raise CheckpointError(
            f"{checkpoint} was written by an older vlmrl and cannot be read ({error}); start a new run."
        ) from error
