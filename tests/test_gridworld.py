"""GridWorld: movement rules, rewards, limits, layouts, the BFS expert, validation and the drawing."""

from __future__ import annotations

import numpy as np
import pytest

from envs.gridworld import AGENT_RGB, BACKGROUND_RGB, GOAL_RGB, GRID_LINE_RGB, WALL_RGB, GridWorldEnv, bfs_distances

UP, DOWN, LEFT, RIGHT = range(4)


def make(layout: dict | None = None, **kwargs) -> GridWorldEnv:
    env = GridWorldEnv(**kwargs)
    env.reset(seed=0, options=layout)
    return env


def test_walls_and_borders_block():
    env = make({"agent": (0, 0), "goal": (4, 4), "walls": [(1, 0)]})
    for action in (UP, LEFT, DOWN):  # border, border, wall
        _, reward, terminated, truncated, info = env.step(action)
        assert env.agent == (0, 0)
        assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    env.step(RIGHT)
    assert env.agent == (0, 1)


def test_goal_gives_reward_and_terminates():
    env = make({"agent": (2, 2), "goal": (2, 3), "walls": []}, step_penalty=0.1)
    _, reward, terminated, truncated, info = env.step(UP)
    assert (reward, terminated, info["success"]) == (-0.1, False, False)
    env.step(DOWN)
    _, reward, terminated, truncated, info = env.step(RIGHT)
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)


def test_truncates_at_max_steps():
    env = make({"agent": (0, 0), "goal": (2, 2), "walls": []}, size=3, max_steps=5)
    outcomes = [env.step(UP)[2:4] for _ in range(5)]
    assert outcomes == [(False, False)] * 4 + [(False, True)]


def test_fixed_start_and_goal_are_corners():
    env = GridWorldEnv(size=6, random_start=False, random_goal=False)
    for seed in range(20):
        env.reset(seed=seed)
        assert (env.agent, env.goal) == ((0, 0), (5, 5))


@pytest.mark.parametrize(
    "kwargs", [{}, {"size": 3, "n_walls": 3}, {"size": 8, "n_walls": 20}, {"size": 2, "n_walls": 1}]
)
def test_layouts_are_valid_and_solvable(kwargs):
    env = GridWorldEnv(**kwargs)
    for seed in range(100):
        env.reset(seed=seed)
        assert env.walls.sum() == env.n_walls
        assert env.agent != env.goal and not env.walls[env.agent] and not env.walls[env.goal]
        assert 0 < bfs_distances(env.walls, env.goal)[env.agent] <= env.max_steps


def test_same_seed_same_layout_and_image():
    first, second = GridWorldEnv(), GridWorldEnv()
    a, _ = first.reset(seed=7)
    b, _ = second.reset(seed=7)
    assert np.array_equal(a["image"], b["image"]) and (first.agent, first.goal) == (second.agent, second.goal)


@pytest.mark.parametrize("kwargs", [{}, {"size": 7, "n_walls": 10}, {"random_start": False, "random_goal": False}])
def test_expert_always_succeeds(kwargs):
    env = GridWorldEnv(**kwargs)
    for seed in range(200):
        env.reset(seed=seed)
        optimal = bfs_distances(env.walls, env.goal)[env.agent]
        terminated = truncated = False
        while not (terminated or truncated):
            *_, terminated, truncated, info = env.step(env.expert_action())
        assert info["success"] and env.steps == optimal, f"seed {seed}"


def test_expert_rationale_is_truthful():
    env = make({"agent": (2, 0), "goal": (2, 2), "walls": [(2, 1)]})
    assert env.expert_rationale() == (
        "The goal is 2 cells right; the shortest path around the walls takes 4 moves and starts up."
    )
    env = make({"agent": (3, 1), "goal": (2, 3), "walls": []})
    assert env.expert_rationale() == (
        "The goal is 2 cells right and 1 cell up; the shortest path takes 3 moves and starts up."
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 1}, "size=1"),
        ({"size": 4.5}, "size=4.5"),
        ({"n_walls": -1}, "n_walls=-1"),
        ({"size": 3, "n_walls": 4}, "from 0 to 3"),
        ({"cell_px": 3}, "cell_px=3"),
        ({"max_steps": 3}, "at least 8"),
        ({"step_penalty": -0.1}, "non-negative"),
        ({"render_mode": "human"}, "rgb_array"),
    ],
)
def test_bad_kwargs_raise_helpful_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GridWorldEnv(**kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"agent": (5, 0)}, "off the 5x5 grid"),
        ({"agent": (1, 1), "goal": (1, 1)}, "different cells"),
        ({"agent": (0, 0), "goal": (0, 2), "walls": [(0, 1), (1, 0), (1, 1)]}, "unreachable"),
        ({"wals": []}, "unknown reset options"),
    ],
)
def test_bad_reset_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        GridWorldEnv().reset(seed=0, options=options)


def test_invalid_action_raises():
    env = make()
    with pytest.raises(ValueError, match="invalid action 4"):
        env.step(4)


def test_text_hint_only_when_asked():
    layout = {"agent": (0, 1), "goal": (3, 2), "walls": [(1, 1)]}
    plain, hinted = make(layout), make(layout, text_hint=True)
    assert plain._text() == "Step 0 of 20."
    assert "You are at (1, 2); the goal is at (4, 3); walls: (2, 2)." in hinted._text()


def test_drawing_is_crisp():
    env = make({"agent": (0, 0), "goal": (4, 4), "walls": [(2, 2)]}, cell_px=16)
    image = env.render()
    assert image.shape == (80, 80, 3) and image.dtype == np.uint8

    def cell(row, col):
        return image[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]

    # A wall fills its whole cell (one ViT patch) with one colour; an empty cell is a frame and a flat inside.
    assert (cell(2, 2) == WALL_RGB).all()
    assert (cell(1, 3)[1:-1, 1:-1] == BACKGROUND_RGB).all()
    assert (cell(1, 3)[0] == GRID_LINE_RGB).all() and (cell(1, 3)[:, -1] == GRID_LINE_RGB).all()
    assert (cell(4, 4)[2:-2, 2:-2] == GOAL_RGB).all()
    assert (cell(0, 0)[4:12, 4:12] == AGENT_RGB).all()
    # No blending anywhere: every pixel is one of the palette colours.
    palette = {BACKGROUND_RGB, GRID_LINE_RGB, WALL_RGB, GOAL_RGB, AGENT_RGB}
    assert {tuple(int(v) for v in p) for p in image.reshape(-1, 3)} == palette
    # Every empty cell looks the same, wherever it is.
    assert np.array_equal(cell(1, 3), cell(3, 0))


def test_agent_drawn_over_goal_on_success():
    env = make({"agent": (0, 0), "goal": (0, 1), "walls": []})
    observation, *_ = env.step(RIGHT)
    goal_cell = observation["image"][0:16, 16:32]
    assert (goal_cell[7:9, 7:9] == AGENT_RGB).all() and (goal_cell[2, 2] == GOAL_RGB).all()
