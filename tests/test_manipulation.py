"""Reach and Push: action directions (in the world and on screen), continuous actions, rewards, experts,
physics sanity, pickling and validation."""

from __future__ import annotations

import os
import pickle

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401 - registers the ids
from envs.manipulation import ACTION_NAMES, DIRECTIONS, MAX_STEP_M, WORKSPACE_HIGH, PushEnv, ReachEnv

LEFT, RIGHT, FORWARD, BACKWARD, UP, DOWN = range(6)
# Push layouts with the box out of the gripper's way, so that only the gripper moves.
FREE = {ReachEnv: {}, PushEnv: {"box": (0.15, 0.15), "goal": (0.15, -0.15)}}


@pytest.fixture(scope="module", params=[ReachEnv, PushEnv], ids=["Reach", "Push"])
def env(request):
    env = request.param()
    yield env
    env.close()


@pytest.fixture(scope="module")
def push():
    env = PushEnv()
    yield env
    env.close()


def test_action_names_match_directions():
    assert ReachEnv.language.action_names == PushEnv.language.action_names == ACTION_NAMES
    assert DIRECTIONS.shape == (6, 3) and (np.abs(DIRECTIONS).sum(axis=1) == 1).all()


@pytest.mark.parametrize("action", range(6), ids=ACTION_NAMES)
def test_discrete_action_moves_gripper_in_world_direction(env, action):
    start = np.array([0.0, 0.0, 0.1])
    env.reset(seed=0, options={"gripper": start, **FREE[type(env)]})
    env.step(action)
    np.testing.assert_allclose(env.gripper_pos - start, DIRECTIONS[action] * MAX_STEP_M, atol=1e-9)


def _on_screen(env, point):
    """Where a world point lands in the camera's image, in units of the half image (x right, y up)."""
    camera = env.model.camera("front").id
    rotation = env.data.cam_xmat[camera].reshape(3, 3)  # columns: image right, image up, backwards
    x, y, z = rotation.T @ (point - env.data.cam_xpos[camera])
    focal = 1 / np.tan(np.radians(env.model.cam_fovy[camera]) / 2)
    return np.array([focal * x / -z, focal * y / -z])


@pytest.mark.parametrize(
    ("action", "gripper_moves", "shadow_moves"),
    [
        (RIGHT, "right", "right"),
        (LEFT, "left", "left"),
        (FORWARD, "up", "up"),
        (BACKWARD, "down", "down"),
        (UP, "up", "still"),  # only the shadow tells up from forward
        (DOWN, "down", "still"),
    ],
)
def test_action_names_read_right_from_the_camera(action, gripper_moves, shadow_moves):
    env = ReachEnv(image_size=32)
    start = np.array([0.0, 0.0, 0.1])
    env.reset(seed=0, options={"gripper": start})
    shadow = np.array([start[0], start[1], 0.0])
    before = _on_screen(env, start), _on_screen(env, shadow)
    env.step(action)
    end = env.gripper_pos
    after = _on_screen(env, end), _on_screen(env, np.array([end[0], end[1], 0.0]))
    expected = {"right": (0, 1), "left": (0, -1), "up": (1, 1), "down": (1, -1)}
    for (old, new), moves in zip(zip(before, after, strict=True), (gripper_moves, shadow_moves), strict=True):
        if moves == "still":
            np.testing.assert_allclose(new, old, atol=1e-9)
        else:
            axis, sign = expected[moves]
            assert sign * (new[axis] - old[axis]) > 0.05, moves
    env.close()


def test_rendered_gripper_moves_on_screen():
    env = ReachEnv(image_size=128)

    def dark_centroid(image):
        rows, cols = np.nonzero(image.max(axis=2) < 80)  # gripper and its shadow; the table is light
        return np.array([cols.mean(), rows.mean()])

    start = {"gripper": (0.0, 0.0, 0.1), "target": (0.15, 0.15, 0.1)}
    first = dark_centroid(env.reset(seed=0, options=start)[0]["image"])
    moved = dark_centroid(env.step(RIGHT)[0]["image"])
    assert moved[0] - first[0] > 3 and abs(moved[1] - first[1]) < 1
    env.reset(seed=0, options=start)
    moved = dark_centroid(env.step(FORWARD)[0]["image"])
    assert first[1] - moved[1] > 3  # further away: higher in the image
    env.close()


def test_workspace_bounds_clip(env):
    corner = WORKSPACE_HIGH.copy()
    env.reset(seed=0, options={"gripper": corner, **FREE[type(env)]})
    for action in (RIGHT, FORWARD, UP):
        env.step(action)
    np.testing.assert_allclose(env.gripper_pos, corner)
    env.step(DOWN)
    np.testing.assert_allclose(env.gripper_pos, corner - [0, 0, MAX_STEP_M])


def test_continuous_step_scales_and_clips(env):
    start = np.array([0.0, 0.0, 0.1])
    options = {"gripper": start, **FREE[type(env)]}
    env.reset(seed=0, options=options)
    observation, reward, terminated, truncated, info = env.step_continuous(np.array([0.5, -0.25, 0.0], np.float32))
    np.testing.assert_allclose(env.gripper_pos - start, [0.02, -0.01, 0.0], atol=1e-7)
    assert observation["image"].dtype == np.uint8 and isinstance(info["success"], bool)
    env.reset(seed=0, options=options)
    env.step_continuous([3.0, -3.0, 10.0])
    np.testing.assert_allclose(env.gripper_pos - start, [MAX_STEP_M, -MAX_STEP_M, MAX_STEP_M], atol=1e-9)
    assert env.continuous_action_space == gym.spaces.Box(-1, 1, (3,), np.float32)


@pytest.mark.parametrize("action", [[1.0, 0.0], [np.nan, 0.0, 0.0], "left"])
def test_bad_continuous_action_raises(env, action):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="3 finite numbers"):
        env.step_continuous(action)


@pytest.mark.parametrize("action", range(6), ids=ACTION_NAMES)
def test_discrete_step_is_the_continuous_unit_step(push, action):
    push.reset(seed=3)
    twin = pickle.loads(pickle.dumps(push))
    discrete, continuous = push.step(action), twin.step_continuous(DIRECTIONS[action])
    assert np.array_equal(discrete[0]["image"], continuous[0]["image"]) and discrete[1:] == continuous[1:]
    twin.close()


def test_invalid_discrete_action_raises(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="invalid action 6"):
        env.step(6)


def test_reach_success_rewards_and_terminates():
    env = ReachEnv(image_size=32)
    _, info = env.reset(seed=0, options={"gripper": (0.0, 0.0, 0.1), "target": (0.07, 0.0, 0.1)})
    assert info == {"success": False, "potential": pytest.approx(-0.07)}  # potential: minus the distance
    assert env.expert_rationale() == "The ball is 7 cm right of the gripper; the largest gap is right, so I move right."
    _, reward, terminated, truncated, info = env.step(RIGHT)
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    env.close()


def _run_expert(env_id: str, seeds: range) -> tuple[float, int]:
    env = gym.make(env_id, image_size=32)
    successes, longest = 0, 0
    for seed in seeds:
        env.reset(seed=seed)
        terminated = truncated = False
        steps = 0
        while not (terminated or truncated):
            *_, terminated, truncated, info = env.step(env.unwrapped.expert_action())
            steps += 1
        successes += info["success"]
        longest = max(longest, steps)
    env.close()
    return successes / len(seeds), longest


def test_reach_expert_succeeds():
    success, longest = _run_expert("vlmrl/Reach-v0", range(50))
    assert success == 1.0 and longest <= 20


def test_push_expert_succeeds():
    success, _ = _run_expert("vlmrl/Push-v0", range(20))
    assert success == 1.0


def test_push_expert_recovers_from_random_actions(push):
    rng = np.random.default_rng(0)
    for seed in range(5):
        push.reset(seed=seed)
        for _ in range(15):
            push.step(int(rng.integers(6)))
        for _ in range(100):
            if push.step(push.expert_action())[2]:
                break
        assert push._solved(), f"seed {seed}"


def test_pushing_moves_the_box_straight(push):
    push.reset(seed=0, options={"gripper": (-0.16, 0.0, 0.017), "box": (-0.08, 0.0), "goal": (0.15, 0.15)})
    xs = [push.box_pos[0]]
    for _ in range(3):
        push.step(RIGHT)
        xs.append(push.box_pos[0])
    assert np.all(np.diff(xs)[1:] > 0.03), xs  # the first move closes the gap, then the box keeps pace
    box = push.box_pos
    assert abs(box[1]) < 0.005 and abs(box[2] - push.BOX_HALF_M) < 0.002  # straight, and still on the table
    assert "push it" in push.expert_rationale() or "backward" in push.expert_rationale()


def test_gripper_rests_on_the_box_instead_of_crushing_it(push):
    push.reset(seed=0, options={"gripper": (0.0, 0.0, 0.15), "box": (0.01, 0.0), "goal": (0.15, 0.15)})
    for _ in range(5):
        push.step(DOWN)
    box = push.box_pos
    assert push.gripper_pos[2] >= 2 * push.BOX_HALF_M + 0.015
    assert abs(box[2] - push.BOX_HALF_M) < 0.002 and np.linalg.norm(box[:2] - [0.01, 0.0]) < 0.005


def test_truncates_at_max_steps():
    env = ReachEnv(image_size=32, max_steps=3)
    env.reset(seed=0, options={"gripper": (0.0, 0.0, 0.1), "target": (0.15, 0.15, 0.15)})
    assert [env.step(DOWN)[2:4] for _ in range(3)] == [(False, False), (False, False), (False, True)]
    with pytest.raises(ValueError, match="max_steps=0"):
        ReachEnv(max_steps=0)


def test_render_shape_and_dtype():
    env = PushEnv(image_size=48)
    observation, _ = env.reset(seed=0)
    assert observation["image"].shape == (48, 48, 3) and observation["image"].dtype == np.uint8
    assert np.array_equal(env.render(), observation["image"])
    assert env.observation_space.contains(observation)
    env.close()
    env.close()  # closing twice is harmless


@pytest.mark.parametrize("image_size", [8, 64.0, 4096])
def test_bad_image_size_raises(image_size):
    with pytest.raises(ValueError, match="image_size"):
        ReachEnv(image_size=image_size)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"box": (0.0, 0.0)}, "unknown reset option 'box'"),
        ({"target": (0.0, 0.0)}, "give 3 finite coordinates"),
        ({"gripper": (0.0, 0.0, 0.5)}, "outside the workspace"),
    ],
)
def test_bad_reset_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        ReachEnv(image_size=32).reset(seed=0, options=options)


def test_pickle_round_trip_continues_identically(push):
    push.reset(seed=11)
    copy = pickle.loads(pickle.dumps(push))
    for _ in range(12):  # the expert pushes the box, so contacts and the solver's warm start matter
        action = push.expert_action()
        assert copy.expert_action() == action
        ours, theirs = push.step(action), copy.step(action)
        assert np.array_equal(ours[0]["image"], theirs[0]["image"]) and ours[1:] == theirs[1:]
    assert np.array_equal(push.data.qpos, copy.data.qpos) and np.array_equal(push.data.qvel, copy.data.qvel)
    copy.close()


def test_step_text_hides_state_unless_hinted():
    env = gym.make("vlmrl/Push-v0", image_size=32)
    observation, _ = env.reset(seed=0)
    assert observation["text"] == "Step 0 of 100."
    env.close()
    hinted = PushEnv(image_size=32, text_hint=True)
    hinted.reset(seed=0, options={"gripper": (0.0, 0.04, 0.1), "box": (0.05, 0.0), "goal": (-0.05, 0.0)})
    assert hinted.step(UP)[0]["text"] == (
        "Step 1 of 100. Gripper at (0.0, 4.0, 14.0) cm, box at (5.0, 0.0) cm, disk at (-5.0, 0.0) cm. "
        "x is right, y is forward, z is up."
    )
    hinted.close()


def test_the_default_gl_backend_falls_back_where_libegl_is_missing():
    from envs.manipulation import default_gl_backend

    assert default_gl_backend(lambda name: f"lib{name}.so.1") == "egl"
    assert default_gl_backend(lambda name: "libOSMesa.so.8" if name == "OSMesa" else None) == "osmesa"
    assert default_gl_backend(lambda name: None) == "disable"


def test_with_rendering_disabled_envs_import_and_reach_says_what_to_install():
    """Where no GL library exists, ``import envs`` must still work for every other env (seen on a GPU host)."""
    import subprocess
    import sys

    code = (
        "import envs, gymnasium as gym\n"
        "gym.make('vlmrl/GridWorld-v0').reset(seed=0)\n"
        "try:\n"
        "    gym.make('vlmrl/Reach-v0').reset(seed=0)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "MUJOCO_GL": "disable"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rendering is disabled" in result.stdout and "libegl1" in result.stdout
