"""The trajectory store: round trip, crash safety, damaged shards, selection helpers, expert collection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import gymnasium as gym
import numpy as np
import pytest

import envs
from agents.trajectories import (
    COLUMNS,
    SCHEMA_VERSION,
    StepRecord,
    TrajectoryWriter,
    check_store,
    collect_expert,
    episode_rows,
    episodes,
    from_source,
    load_trajectories,
    successes,
    top_fraction,
)

ENV_ID = "vlmrl/GridWorld-v0"
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_steps(rewards: list[float], seed: int = 0, success: bool = False, invalid_at: int | None = None):
    """A hand-made episode of ``len(rewards)`` steps with random 8x8 images; the last step terminates."""
    rng = np.random.default_rng(seed)
    steps = []
    for index, reward in enumerate(rewards):
        last = index == len(rewards) - 1
        invalid = index == invalid_at
        steps.append(
            StepRecord(
                image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                step_text=f"Step {index}.",
                answer="jump" if invalid else "right",
                action=-1 if invalid else 3,
                reward=reward,
                terminated=last,
                truncated=False,
                action_name=None if invalid else "right",
                invalid_reason='action "jump" is not legal' if invalid else None,
                reward_parts={"env": reward + 1.0, "invalid": -1.0} if invalid else None,
                logprob=-0.5 * index,
                success=success and last,
            )
        )
    return steps


def write_episodes(path: Path, specs: list[tuple[list[float], bool]], shard_size: int = 4, source: str = "expert"):
    """Write one episode per ``(rewards, success)``; return their ids."""
    with TrajectoryWriter(path, shard_size=shard_size) as writer:
        return [
            writer.add_episode(
                make_steps(rewards, seed=index, success=success),
                env_id=ENV_ID,
                seed=index,
                prompt_style="cot",
                source=source,
                env_options={"size": 4},
            )
            for index, (rewards, success) in enumerate(specs)
        ]


# ----------------------------------------------------------------------------------------------------------
# Rows, writing and reading
# ----------------------------------------------------------------------------------------------------------


def test_return_to_go_and_episode_fields_by_hand():
    rows = episode_rows(
        make_steps([0.5, -1.0, 2.0], success=True), env_id=ENV_ID, seed=7, prompt_style="action", source="expert"
    )
    assert [row["return_to_go"] for row in rows] == [1.5, 1.0, 2.0]
    assert {row["episode_return"] for row in rows} == {1.5}
    assert {row["episode_length"] for row in rows} == {3}
    assert {row["success"] for row in rows} == {True}
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert len({row["episode_id"] for row in rows}) == 1 and rows[0]["episode_id"].startswith("GridWorld-v0-7-")
    assert rows[0]["prompt"] == envs.build_prompt(envs.get_language(ENV_ID), "Step 0.", "action")
    assert json.loads(rows[0]["reward_parts"]) == {"env": 0.5}


def test_episode_rows_rejects_bad_steps():
    with pytest.raises(ValueError, match="whole episodes"):
        episode_rows(make_steps([0.0, 1.0])[:1], env_id=ENV_ID, seed=0, prompt_style="cot", source="expert")
    steps = make_steps([0.0, 1.0])
    steps[1].action, steps[1].action_name = -1, None
    with pytest.raises(ValueError, match="needs an invalid_reason"):
        episode_rows(steps, env_id=ENV_ID, seed=0, prompt_style="cot", source="expert")
    steps = make_steps([0.0, 1.0])
    steps[0].reward_parts = {"env": 0.0, "bonus": 0.5}
    with pytest.raises(ValueError, match="sum to 0.5"):
        episode_rows(steps, env_id=ENV_ID, seed=0, prompt_style="cot", source="expert")
    with pytest.raises(ValueError, match="at least one step"):
        episode_rows([], env_id=ENV_ID, seed=0, prompt_style="cot", source="expert")
    with pytest.raises(ValueError, match="prompt style"):
        episode_rows(make_steps([1.0]), env_id=ENV_ID, seed=0, prompt_style="json", source="expert")


def test_round_trip_over_several_shards(tmp_path):
    store = tmp_path / "store"
    specs = [([0.0, 1.0], True), ([0.0, 0.0, -1.0], False), ([2.0], True), ([0.5, 0.5, 0.5], False), ([1.0], True)]
    with TrajectoryWriter(store, shard_size=3) as writer:
        expected = []
        for index, (rewards, success) in enumerate(specs):
            steps = make_steps(rewards, seed=index, success=success, invalid_at=1 if index == 3 else None)
            rows = episode_rows(
                steps,
                env_id=ENV_ID,
                seed=index,
                prompt_style="cot",
                source="run:runs/x@update-3",
                env_options={"size": 4},
            )
            writer.add_episode(
                steps,
                env_id=ENV_ID,
                seed=index,
                prompt_style="cot",
                source="run:runs/x@update-3",
                env_options={"size": 4},
                episode_id=rows[0]["episode_id"],
            )
            expected.extend(rows)
    assert sorted(path.name for path in (store / "shards").iterdir()) == [f"shard-00000{i}.parquet" for i in range(3)]
    assert json.loads((store / "store.json").read_text())["schema_version"] == SCHEMA_VERSION == 2

    dataset = load_trajectories(store)
    assert dataset.column_names == list(COLUMNS)
    assert isinstance(dataset.features["image"], datasets.Image)
    assert len(dataset) == len(expected) == 10
    for got, want in zip(dataset, expected):
        image = np.asarray(got.pop("image"))
        assert image.dtype == np.uint8 and np.array_equal(image, want.pop("image"))
        assert got == want
    invalid = dataset[7]  # episode 3 starts at row 6; its step 1 is invalid
    assert (invalid["action"], invalid["valid"], invalid["action_name"]) == (-1, False, None)
    assert json.loads(invalid["reward_parts"]) == {"env": 1.5, "invalid": -1.0}
    check_store(dataset, env_id=ENV_ID)


def test_append_continues_numbering_and_one_writer_at_a_time(tmp_path):
    store = tmp_path / "store"
    write_episodes(store, [([1.0], True)], shard_size=1)
    with TrajectoryWriter(store, shard_size=1) as writer:
        with pytest.raises(RuntimeError, match="another TrajectoryWriter"):
            TrajectoryWriter(store)
        writer.add_episode(make_steps([2.0]), env_id=ENV_ID, seed=5, prompt_style="cot", source="expert")
        assert writer.shards_written == [store / "shards" / "shard-000001.parquet"]
    assert load_trajectories(store)["reward"][:] == [1.0, 2.0]


@pytest.mark.parametrize("killed_while", ["buffering", "writing"])
def test_killed_writer_keeps_earlier_shards(tmp_path, killed_while):
    store = tmp_path / "store"
    # Two shards of one 3-step episode each, then a third episode: buffered (2 steps, below shard_size)
    # or caught halfway through writing its shard (half its bytes in the temporary file).
    script = f"""
import sys, time
import numpy as np
import agents.trajectories as trajectories
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trajectories import make_steps

writer = trajectories.TrajectoryWriter({str(store)!r}, shard_size=3)
for seed in range(2):
    writer.add_episode(make_steps([0.0, 0.0, 1.0], seed=seed), env_id={ENV_ID!r}, seed=seed, prompt_style="cot", source="expert")
if {killed_while!r} == "writing":
    import io
    real_write_table = trajectories.pq.write_table
    def write_half(table, file):
        whole = io.BytesIO()
        real_write_table(table, whole)
        file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        file.flush()
        print("ready", flush=True)
        time.sleep(60)
    trajectories.pq.write_table = write_half
    writer.add_episode(make_steps([0.0, 0.0, 1.0], seed=2), env_id={ENV_ID!r}, seed=2, prompt_style="cot", source="expert")
else:
    writer.add_episode(make_steps([0.0, 1.0], seed=2), env_id={ENV_ID!r}, seed=2, prompt_style="cot", source="expert")
    print("ready", flush=True)
    time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", "the writer script failed before it was killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()

    names = sorted(path.name for path in (store / "shards").iterdir())
    assert [name for name in names if not name.startswith(".")] == ["shard-000000.parquet", "shard-000001.parquet"]
    if killed_while == "writing":
        assert len(names) == 3 and names[0].endswith(".tmp")  # the half-written shard, under its temporary name
    dataset = load_trajectories(store)
    assert len(dataset) == 6 and dataset["seed"][:] == [0, 0, 0, 1, 1, 1]

    # The lock died with the writer; the next writer clears the leftover and continues the numbering.
    with TrajectoryWriter(store, shard_size=1) as writer:
        writer.add_episode(make_steps([1.0]), env_id=ENV_ID, seed=9, prompt_style="cot", source="expert")
    assert sorted(path.name for path in (store / "shards").iterdir())[-1] == "shard-000002.parquet"
    assert not [path for path in (store / "shards").iterdir() if path.name.startswith(".")]


def test_damaged_shard_is_named_and_can_be_skipped(tmp_path):
    store = tmp_path / "store"
    write_episodes(store, [([1.0], True), ([0.0, 2.0], True), ([3.0], False)], shard_size=1)
    damaged = store / "shards" / "shard-000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-000001\.parquet.*skip_bad_shards=True"):
        load_trajectories(store)
    with pytest.warns(UserWarning, match=r"shard-000001\.parquet"):
        dataset = load_trajectories(store, skip_bad_shards=True)
    assert dataset["reward"][:] == [1.0, 3.0]


def test_bad_store_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_trajectories(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No store path"):
        load_trajectories("")
    with pytest.raises(ValueError, match="No store path"):
        TrajectoryWriter("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a trajectory store"):
        load_trajectories(tmp_path / "other")
    with pytest.raises(ValueError, match="not a trajectory store"):
        TrajectoryWriter(tmp_path / "other")
    TrajectoryWriter(tmp_path / "empty").close()
    with pytest.raises(ValueError, match="holds no steps yet"):
        load_trajectories(tmp_path / "empty")
    with pytest.raises(ValueError, match="shard_size"):
        TrajectoryWriter(tmp_path / "empty", shard_size=0)
    info = json.loads((tmp_path / "empty" / "store.json").read_text())
    (tmp_path / "empty" / "store.json").write_text(json.dumps({**info, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        load_trajectories(tmp_path / "empty")
    for _ in range(2):  # the failed writer released the lock: the second try fails the same way
        with pytest.raises(ValueError, match="schema version 99"):
            TrajectoryWriter(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_episodes(tmp_path_factory):
    """Returns 1, 3, 3, 0 (lengths 1, 2, 3, 2); the first and third succeed; the last from another source."""
    store = tmp_path_factory.mktemp("selection") / "store"
    ids = write_episodes(store, [([1.0], True), ([1.0, 2.0], False), ([1.0, 1.0, 1.0], True)])
    with TrajectoryWriter(store) as writer:
        ids.append(
            writer.add_episode(make_steps([0.0, 0.0]), env_id=ENV_ID, seed=3, prompt_style="cot", source="ckpt/a")
        )
    return load_trajectories(store), ids


def test_successes_and_sources(four_episodes):
    dataset, ids = four_episodes
    assert set(successes(dataset)["episode_id"]) == {ids[0], ids[2]}
    assert len(from_source(dataset, "ckpt/a")) == 2
    with pytest.raises(ValueError, match=r"sources are \['ckpt/a', 'expert'\]"):
        from_source(dataset, "ckpt/b")
    with pytest.raises(ValueError, match="None of the 1 episodes"):
        successes(from_source(dataset, "ckpt/a"))


def test_top_fraction_keeps_whole_episodes_and_breaks_ties_by_order(four_episodes):
    dataset, ids = four_episodes
    assert list(top_fraction(dataset, 0.5)["episode_id"]) == [ids[1]] * 2 + [ids[2]] * 3
    assert set(top_fraction(dataset, 0.25)["episode_id"]) == {ids[1]}  # tie at 3.0: the earlier episode
    assert set(top_fraction(dataset, 0.6)["episode_id"]) == {ids[0], ids[1], ids[2]}  # ceil(2.4) = 3
    assert len(top_fraction(dataset, 1.0)) == len(dataset)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        top_fraction(dataset, 0.0)


def test_episodes_groups_rows_in_step_order(four_episodes):
    dataset, ids = four_episodes
    shuffled = dataset.select(list(reversed(range(len(dataset)))))
    grouped = episodes(shuffled)
    assert [episode["episode_id"][0] for episode in grouped] == list(reversed(ids))
    assert [list(episode["step"]) for episode in grouped] == [[0, 1], [0, 1, 2], [0, 1], [0]]
    assert [list(episode["return_to_go"]) for episode in grouped][1] == [3.0, 2.0, 1.0]


def test_check_store_rejects_other_data(four_episodes):
    dataset, _ = four_episodes
    with pytest.raises(ValueError, match=r"steps of \['vlmrl/GridWorld-v0'\], not only of 'vlmrl/Blackjack-v0'"):
        check_store(dataset, env_id="vlmrl/Blackjack-v0")
    with pytest.raises(ValueError, match=r"lacks the columns \['answer'\]"):
        check_store(dataset.remove_columns("answer"))
    with pytest.raises(ValueError, match="one split"):
        check_store(datasets.DatasetDict({"train": dataset}))
    with pytest.raises(ValueError, match="no rows"):
        check_store(dataset.select([]))


# ----------------------------------------------------------------------------------------------------------
# Expert collection
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_style", ["cot", "action"])
def test_expert_collection_on_gridworld(tmp_path, prompt_style):
    env_kwargs = {"size": 4, "n_walls": 1}
    summary = collect_expert(
        ENV_ID, tmp_path / "store", episodes=5, env_kwargs=env_kwargs, seed=10, prompt_style=prompt_style, shard_size=4
    )
    assert summary["success_rate"] == 1.0 and summary["episodes"] == 5
    dataset = load_trajectories(tmp_path / "store")
    assert len(dataset) == summary["steps"]
    check_store(dataset, env_id=ENV_ID)
    spec = envs.get_language(ENV_ID)
    for episode in episodes(dataset):
        rows = episode.remove_columns("image").to_list()
        assert {row["source"] for row in rows} == {"expert"} and all(row["success"] for row in rows)
        assert json.loads(rows[0]["env_options"]) == env_kwargs
        # Replay the seed: same observations, and the stored thoughts are the rationale before each step.
        env = gym.make(ENV_ID, **env_kwargs)
        observation, _ = env.reset(seed=rows[0]["seed"])
        for row, image in zip(rows, episode["image"]):
            assert np.array_equal(np.asarray(image), observation["image"]) and row["step_text"] == observation["text"]
            parsed = envs.parse_action(row["answer"], spec, prompt_style)
            assert parsed.valid and parsed.action == row["action"] == env.unwrapped.expert_action()
            if prompt_style == "cot":
                assert row["thoughts"] == env.unwrapped.expert_rationale()
                assert row["answer"] == envs.format_answer(row["action_name"], thoughts=row["thoughts"])
            else:
                assert row["thoughts"] is None and row["answer"] == row["action_name"]
            observation, *_ = env.step(row["action"])
        env.close()


def test_collect_command(tmp_path, cli_fails):
    from experiments.cli import experiment_config, main

    main(["collect", "gridworld", "--expert", "--episodes", "3", "--out", str(tmp_path / "store")])
    dataset = load_trajectories(tmp_path / "store")
    assert sorted(set(dataset["seed"])) == [0, 1, 2] and all(dataset["success"])
    assert json.loads(dataset[0]["env_options"]) == experiment_config("gridworld").env_kwargs()
    assert dataset[0]["prompt_style"] == "cot"
    cli_fails(["collect", "gridworld", "--episodes", "3", "--out", str(tmp_path / "other")], "--expert")
    cli_fails(
        ["collect", "chess", "--expert", "--out", str(tmp_path / "other")], "neither an experiment .*--env-module"
    )


# --- stores written by training runs and by policies ---------------------------------------------------------


def _ppo_config(tmp_path, **overrides):
    import dataclasses as dc

    from agents.policy import PolicyConfig
    from agents.ppo import PPOConfig

    options = dict(
        env_id="vlmrl/GridWorld-v0",
        env_kwargs={"size": 3},  # short episodes: several end in each update
        num_envs=2,
        num_steps=4,
        total_env_steps=32,
        minibatch_size=4,
        micro_batch_size=2,
        update_epochs=1,
        learning_rate=1e-3,
        run_dir=str(tmp_path / "run"),
        progress=False,
        checkpoint_every=2,
        save_trajectories="all",
        policy=dc.replace(
            PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0)
        ),
    )
    options.update(overrides)
    return PPOConfig(**options)


def _comparable(dataset) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("episode_id", "image", "source")} for row in dataset]


def test_a_training_run_stores_whole_episodes_and_resume_stores_none_twice(tmp_path):
    import shutil

    from agents.ppo import train

    straight = train(_ppo_config(tmp_path / "a"))
    stored = load_trajectories(straight / "trajectories")
    assert len(stored) > 0 and all(s.startswith(f"run:{straight}@update-") for s in stored["source"])
    for episode in episodes(stored):
        assert episode["step"] == list(range(len(episode))) and episode[-1]["terminated"] or episode[-1]["truncated"]
        assert episode[0]["seed"] >= 0 or episode[0]["seed"] == -1
    # As if killed after checkpoint 2: the store is cut back to it, and the resumed run adds the rest once.
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "update-000004")
    train(_ppo_config(tmp_path / "ignored", resume=str(resumed)))
    again = load_trajectories(resumed / "trajectories")
    assert _comparable(again) == _comparable(stored)


def test_successes_only_and_a_policy_as_the_collector(tmp_path, cli_fails):
    from agents.ppo import train
    from experiments.cli import main

    run_dir = train(
        _ppo_config(
            tmp_path,
            save_trajectories="successes",
            checkpoint_every=0,
            total_env_steps=64,
            num_steps=8,
            minibatch_size=8,
            micro_batch_size=4,
        )
    )
    assert all(load_trajectories(run_dir / "trajectories")["success"])
    out = tmp_path / "collected"
    main(["collect", "gridworld", "--model", str(run_dir), "--episodes", "5", "--seed", "100", "--out", str(out)])
    collected = load_trajectories(out)
    assert len(episodes(collected)) == 5
    seeds = sorted({e[0]["seed"] for e in episodes(collected)})
    assert seeds == [100, 101, 102, 103, 104]  # exactly the seeds asked for, whatever ends first
    assert set(collected["source"]) == {str(run_dir / "checkpoints" / "update-000004" / "policy")}  # the newest
    assert all(np.isfinite(collected["logprob"]))
    cli_fails(
        ["collect", "gridworld", "--expert", "--model", str(run_dir), "--out", str(tmp_path / "x")], "one of the two"
    )
    style = json.loads((run_dir / "config.json").read_text())["policy"]["prompt_style"]
    other = "cot" if style == "action" else "action"
    cli_fails(
        ["collect", "gridworld", "--model", str(run_dir), "--prompt-style", other, "--out", str(tmp_path / "y")],
        f"trained to write {style} answers",
    )
    # A preset answers in the style asked for (it used to answer cot whatever --prompt-style said).
    preset = tmp_path / "preset"
    main(["collect", "gridworld", "--model", "tiny", "--prompt-style", other, "--episodes", "1", "--out", str(preset)])
    assert set(load_trajectories(preset)["prompt_style"]) == {other}
