"""Tabletop manipulation in MuJoCo, seen through a fixed camera: reach a ball, push a box into a disk.

The end effector is a block on three slide joints that the environment drives kinematically: before every
physics substep it sets the block's position *and velocity* along a smooth path to the commanded point. A
mocap body would follow the same path, but MuJoCo treats a mocap body as motionless in contacts, so contact
damping would fight the push and the box would lag 2 cm inside the gripper; with a real joint velocity the
box is pushed cleanly. Nothing moves the gripper but the commands (it ignores gravity and contact forces).

An action is an end-effector displacement. The discrete actions are fixed ``MAX_STEP_M`` moves along the
world axes, named as they look from the camera; ``step_continuous`` takes any displacement in
``continuous_action_space`` (a normalised 3-vector scaled by ``MAX_STEP_M``). Both run the same code, so
discrete action ``i`` is the continuous action ``DIRECTIONS[i]``.

World axes as the camera shows them: +x is right, +y is forward (away from the camera), +z is up. The camera
looks down at the table from the front, so a move forward and a move up both go up in the image; the dark
square on the table right under the gripper (and the pole under the reach ball) tells the two apart.
"""

from __future__ import annotations

import ctypes.util
import os
import re


def default_gl_backend(find_library=ctypes.util.find_library) -> str:
    """The offscreen OpenGL backend for MuJoCo when the user set none: EGL, else OSMesa, else none.

    EGL works headless (with Mesa's software renderer where there is no GPU). Where no libEGL is installed
    (GPU containers often lack it), importing mujoco with ``MUJOCO_GL=egl`` raises inside PyOpenGL, and since
    ``import envs`` registers Reach and Push, every env would break: then rendering is disabled, and only
    Reach and Push say so, when they first render (:meth:`TabletopEnv._image`).
    """
    if find_library("EGL"):
        return "egl"
    if find_library("OSMesa"):
        return "osmesa"
    return "disable"


# The backend is chosen when mujoco is imported; a user who exported MUJOCO_GL keeps their choice (and is
# spared the library search, which runs ldconfig).
if "MUJOCO_GL" not in os.environ:
    os.environ["MUJOCO_GL"] = default_gl_backend()

from typing import Any, ClassVar  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from envs.base import LanguageEnv, observation_space  # noqa: E402
from envs.language import LanguageSpec  # noqa: E402
from envs.thoughts import NUMBER, find_offsets, find_tuples, keyword_before, unclaimed_numbers  # noqa: E402

ACTION_NAMES: tuple[str, ...] = ("move left", "move right", "move forward", "move backward", "move up", "move down")
#: World direction of each discrete action (x right, y forward/away from the camera, z up).
DIRECTIONS = np.array([[-1, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
#: Largest end-effector displacement per step in metres; a discrete action moves exactly this far.
MAX_STEP_M = 0.04
#: Half extents of the gripper block (x, y, z) in metres. It is wider than the box, so that a push a
#: little off the box's centre line (discrete moves align within 2 cm) still goes straight, and low, so
#: that it pushes the box below its centre of mass.
GRIPPER_HALF_M = np.array([0.03, 0.03, 0.015])
#: Where the gripper centre may go (x, y, z). The lowest z leaves 2 mm between gripper and table.
WORKSPACE_LOW = np.array([-0.2, -0.2, GRIPPER_HALF_M[2] + 0.002])
WORKSPACE_HIGH = np.array([0.2, 0.2, 0.2])
#: Physics timestep (seconds) and substeps per environment step. A 4 cm move takes 0.16 s with a peak
#: acceleration of 7.7 m/s^2: a box pushed low down (the gripper is only 3 cm tall) then slides instead of
#: tipping over, and runs on about 1 cm after the gripper stops. Shorter moves (0.1 s) made it rock and hop.
TIMESTEP_S = 0.002
N_SUBSTEPS = 80
#: Camera pose (metres): 0.8 m from the workspace centre, 55 degrees above the table, in front of it.
CAMERA_POS = np.array([0.0, -0.44, 0.735])
CAMERA_LOOKAT = np.array([0.0, 0.02, 0.08])
#: Height of the gripper's shadow square above the table top.
_SHADOW_Z = 0.0012

#: How far (centimetres, per axis) a distance in a thought may be from the truth: the rationales round to
#: whole centimetres, and a paraphrase may round once more.
THOUGHT_TOLERANCE_CM = 1.0
# Direction words of a thought as (axis, sign), axes x right, y forward, z up.
_THOUGHT_DIRECTIONS = {
    "right": (0, 1),
    "left": (0, -1),
    "forward": (1, 1),
    "forwards": (1, 1),
    "backward": (1, -1),
    "backwards": (1, -1),
    "back": (1, -1),
    "up": (2, 1),
    "above": (2, 1),
    "down": (2, -1),
    "below": (2, -1),
}
_CM_UNIT = r"cm|centimet(?:re|er)s?"
_DISTANCE_CM = re.compile(rf"({NUMBER})\s*(?:{_CM_UNIT})\b", re.IGNORECASE)
_WITHIN_HALF_CM = re.compile(r"\bless\s+than\s+(?:half\s+a|0\.5)\s+(?:cm|centimet(?:re|er))", re.IGNORECASE)
_GRIPPER_WORDS = r"gripper|i|me|my"
_DIRECTION_WORDS = "|".join(sorted(_THOUGHT_DIRECTIONS, key=len, reverse=True))
_LARGEST_GAP = re.compile(
    r"\b(?:largest|biggest|greatest|longest|main)\s+(?:gap|distance|difference|offset)\s+(?:is\s+)?"
    rf"(?:to\s+the\s+|along\s+)?({_DIRECTION_WORDS})\b",
    re.IGNORECASE,
)
_PUSH_DIRECTION = re.compile(
    rf"\bpush(?:es|ing)?\s+(?:it|the\s+(?:blue\s+)?(?:box|block|cube))\s+(?:to\s+the\s+)?({_DIRECTION_WORDS})\b",
    re.IGNORECASE,
)

# Everything a state snapshot needs to continue a simulation bit for bit: positions, velocities, mocap
# poses, time and the solver's warm start.
_STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION


def camera_xyaxes(position: np.ndarray, lookat: np.ndarray) -> np.ndarray:
    """MJCF ``xyaxes`` of a camera at ``position`` looking at ``lookat`` with image-right along world +x.

    >>> (camera_xyaxes(np.array([0.0, -1.0, 1.0]), np.zeros(3)).round(3) + 0.0).tolist()
    [1.0, 0.0, 0.0, 0.0, 0.707, 0.707]
    """
    forward = (lookat - position) / np.linalg.norm(lookat - position)
    right = np.array([1.0, 0.0, 0.0])
    up = np.cross(right, forward)
    return np.concatenate([right, up / np.linalg.norm(up)])


def _numbers(vector: Any) -> str:
    return " ".join(f"{v:.6g}" for v in np.asarray(vector, dtype=np.float64))


def scene_xml(image_size: int, objects: str = "") -> str:
    """The MJCF of the table, gripper and camera, with ``objects`` added to the world body.

    Shadows and reflections are off (``shadowsize="0"``, no reflective material): with them a software
    rendered 128 px frame costs 3x to 20x more. The offscreen buffer is sized to the image. Collision
    groups: the table (1) touches the box (1|2), the gripper (2) touches only the box.
    """
    gx, gy, gz = GRIPPER_HALF_M
    return f"""
<mujoco model="vlmrl_tabletop">
  <option timestep="{TIMESTEP_S}" integrator="implicitfast"/>
  <visual>
    <global offwidth="{image_size}" offheight="{image_size}"/>
    <quality shadowsize="0"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
    <rgba haze="0.8 0.85 0.9 1"/>
  </visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" width="64" height="64"
             rgb1="0.82 0.76 0.66" rgb2="0.76 0.70 0.60"/>
    <material name="table" texture="grid" texrepeat="12 12" reflectance="0"/>
  </asset>
  <worldbody>
    <light directional="true" pos="0 -0.3 1" dir="0 0.3 -1" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <camera name="front" pos="{_numbers(CAMERA_POS)}" xyaxes="{_numbers(camera_xyaxes(CAMERA_POS, CAMERA_LOOKAT))}"
            fovy="45"/>
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.5" rgba="0.55 0.58 0.62 1"
          contype="0" conaffinity="0"/>
    <geom name="table" type="box" size="0.48 0.48 0.02" pos="0 0 -0.02" material="table" friction="0.5 0.005 0.0001"
          contype="1" conaffinity="1"/>
    <body name="gripper" gravcomp="1">
      <joint name="gripper_x" type="slide" axis="1 0 0"/>
      <joint name="gripper_y" type="slide" axis="0 1 0"/>
      <joint name="gripper_z" type="slide" axis="0 0 1"/>
      <geom name="gripper" type="box" size="{gx} {gy} {gz}" mass="10" friction="0.3 0.005 0.0001"
            rgba="0.2 0.2 0.22 1" contype="2" conaffinity="2"/>
      <geom name="wrist" type="cylinder" fromto="0 0 {gz} 0 0 0.15" size="0.007" mass="0"
            rgba="0.6 0.6 0.62 1" contype="0" conaffinity="0"/>
    </body>
    <body name="gripper_shadow" mocap="true" pos="0 0 {_SHADOW_Z}">
      <geom name="gripper_shadow" type="box" size="{gx} {gy} 0.001" rgba="0.1 0.1 0.1 0.5"
            contype="0" conaffinity="0"/>
    </body>
    {objects}
  </worldbody>
</mujoco>
"""


def action_along(axis: int, sign: float) -> int:
    """The discrete action that moves along world ``axis`` (0 x, 1 y, 2 z) in the direction of ``sign``.

    >>> ACTION_NAMES[action_along(2, -0.3)], ACTION_NAMES[action_along(0, 0.1)]
    ('move down', 'move right')
    """
    return int(np.flatnonzero(DIRECTIONS[:, axis] == (1.0 if sign >= 0 else -1.0))[0])


def _direction_word(axis: int, sign: float) -> str:
    """``"right"``, ``"backward"``, ... for a move along ``axis`` with ``sign``."""
    return ACTION_NAMES[action_along(axis, sign)].removeprefix("move ")


def _cm(vector: np.ndarray) -> str:
    """A position in centimetres, as the step text writes it.

    >>> _cm(np.array([0.1234, -0.04, 0.0]))
    '(12.3, -4.0, 0.0) cm'
    """
    return "(" + ", ".join(f"{100 * v:.1f}" for v in vector) + ") cm"


def _gap_words(delta: np.ndarray) -> str:
    """A displacement in camera words, leaving out components under half a centimetre.

    >>> _gap_words(np.array([0.08, -0.041, 0.0]))
    '8 cm right and 4 cm backward'
    >>> _gap_words(np.array([0.01, 0.02, -0.12]))
    '1 cm right, 2 cm forward and 12 cm down'
    """
    words = [
        f"{100 * abs(value):.0f} cm {_direction_word(axis, value)}"
        for axis, value in enumerate(delta)
        if abs(value) >= 0.005
    ]
    if not words:
        return "less than half a centimetre"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class TabletopEnv(LanguageEnv):
    """What Reach and Push share: the scene, the gripper's motion, rendering, pickling and the step text.

    Subclasses set ``language``, ``objects_xml`` and ``simulate`` (whether the scene has anything for
    physics to move), and implement ``_reset_objects``, ``_solved``, ``_state_words``, ``expert_action``
    and ``expert_rationale``. Reward is 1 on the step that solves the task, which ends the episode, and 0
    otherwise. The environment truncates after ``max_steps`` steps itself (so that the step text can say
    how many steps are left; Gymnasium does not tell an environment its ``TimeLimit``).

    Truthful thoughts (``check_thoughts``): distances are in centimetres, each within
    ``THOUGHT_TOLERANCE_CM`` of the truth per axis. An offset is one or more "N cm direction" phrases
    (right/left, forward/backward, up/down; "cm" may be left out); a direction left out means less than the
    tolerance that way. Followed by "of/from the X", it is the thing named before it (or else the task's
    other object) seen from X; without one, it is the move still to make (the ball from the gripper in
    Reach, the disk from the box in Push). Positions written as tuples, "(12.3, -4.0, 0.0)", as in the
    step text, must be the position of the object named before them. Any other "N cm" must be one of the
    scene's distances or coordinates; any other number a step count, the step limit or 4 (a move's
    length). What each task requires besides: see :class:`ReachEnv` and :class:`PushEnv`.

    Args:
        render_mode: Only ``"rgb_array"`` (or ``None``).
        image_size: Side of the square image in pixels (16 to 1024).
        max_steps: Steps before truncation; defaults to ``default_max_steps`` of the task.
        text_hint: Also state the positions of the gripper and objects in the step text (an ablation: by
            default the text gives only the step count, and positions must be read from the image).
    """

    objects_xml: ClassVar[str] = ""
    simulate: ClassVar[bool] = True
    default_max_steps: ClassVar[int] = 100
    #: Positions ``reset(options=...)`` accepts, with their number of coordinates.
    reset_options: ClassVar[dict[str, int]] = {"gripper": 3}
    #: The underlying continuous action: a gripper displacement in units of ``MAX_STEP_M`` (x, y, z).
    continuous_action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)

    def __init__(
        self,
        render_mode: str | None = "rgb_array",
        image_size: int = 128,
        max_steps: int | None = None,
        text_hint: bool = False,
    ) -> None:
        super().__init__(render_mode)
        if max_steps is None:
            max_steps = self.default_max_steps
        if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(
                f"{type(self).__name__}: max_steps={max_steps!r}; use a positive integer, or None for "
                f"{self.default_max_steps}."
            )
        self.max_steps = int(max_steps)
        if (
            not isinstance(image_size, (int, np.integer))
            or isinstance(image_size, bool)
            or not 16 <= image_size <= 1024
        ):
            raise ValueError(
                f"{type(self).__name__}: image_size={image_size!r}; use an integer from 16 to 1024 pixels."
            )
        self.image_size = int(image_size)
        self.text_hint = bool(text_hint)
        self.observation_space = observation_space(self.image_size, self.image_size)
        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        self.steps = 0
        self._xml = scene_xml(self.image_size, self.objects_xml)
        self._build()

    def _build(self) -> None:
        """Compile the scene and look up what the environment uses; the renderer waits for the first frame."""
        self.model = mujoco.MjModel.from_xml_string(self._xml)
        self.data = mujoco.MjData(self.model)
        self._renderer: mujoco.Renderer | None = None
        self._gripper_qpos = int(self.model.jnt_qposadr[self.model.joint("gripper_x").id])
        self._gripper_qvel = int(self.model.jnt_dofadr[self.model.joint("gripper_x").id])
        self._shadow_mocap = self._mocap_id("gripper_shadow")
        mujoco.mj_forward(self.model, self.data)

    def _mocap_id(self, body_name: str) -> int:
        return int(self.model.body_mocapid[self.model.body(body_name).id])

    # -- gymnasium API ----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Place the gripper and objects at random.

        Args:
            seed: Seeds ``self.np_random`` (as in every Gymnasium env).
            options: Optional fixed positions in metres, for tests and hand-made evaluations, named as in
                ``reset_options`` (``"gripper"``: x, y, z; Reach ``"target"``: x, y, z; Push ``"box"`` and
                ``"goal"``: x, y). The rest is drawn as usual.
        """
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self._reset_objects()
        for name, value in (options or {}).items():
            if name not in self.reset_options:
                raise ValueError(
                    f"{type(self).__name__}: unknown reset option {name!r}; use any of {self.reset_options}."
                )
            vector = np.asarray(value, dtype=np.float64)
            if vector.shape != (self.reset_options[name],) or not np.all(np.isfinite(vector)):
                raise ValueError(
                    f"{type(self).__name__}: reset option {name!r}={value!r}; give {self.reset_options[name]} "
                    "finite coordinates in metres."
                )
            if name == "gripper" and not np.all((vector >= WORKSPACE_LOW) & (vector <= WORKSPACE_HIGH)):
                raise ValueError(
                    f"{type(self).__name__}: gripper position {value!r} is outside the workspace "
                    f"{WORKSPACE_LOW.tolist()} .. {WORKSPACE_HIGH.tolist()}."
                )
            self._place(name, vector)
        mujoco.mj_forward(self.model, self.data)
        self.steps = 0
        return self._observation(), {"success": False, **self._potential_info()}

    def step(self, action: Any):
        """Move the gripper ``MAX_STEP_M`` in the direction that ``ACTION_NAMES[action]`` names."""
        return self._move(DIRECTIONS[self._check_action(action)])

    def step_continuous(self, action: Any):
        """Move the gripper by ``clip(action, -1, 1) * MAX_STEP_M`` (x right, y forward, z up).

        Returns the same ``(observation, reward, terminated, truncated, info)`` as :meth:`step`.
        """
        try:
            displacement = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            displacement = np.full(1, np.nan)
        if displacement.shape != (3,) or not np.all(np.isfinite(displacement)):
            raise ValueError(
                f"{type(self).__name__}: continuous action {action!r} must be 3 finite numbers "
                "(x right, y forward, z up) in [-1, 1]; larger values are clipped."
            )
        return self._move(np.clip(displacement, -1.0, 1.0))

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- motion -----------------------------------------------------------------------------------------
    @property
    def gripper_pos(self) -> np.ndarray:
        """Gripper centre (x, y, z) in metres (a copy)."""
        return self.data.qpos[self._gripper_qpos : self._gripper_qpos + 3].copy()

    def _set_gripper(self, position: np.ndarray, velocity: Any = 0.0) -> None:
        self.data.qpos[self._gripper_qpos : self._gripper_qpos + 3] = position
        self.data.qvel[self._gripper_qvel : self._gripper_qvel + 3] = velocity
        self.data.mocap_pos[self._shadow_mocap] = (position[0], position[1], _SHADOW_Z)

    def _limit_target(self, start: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Hook to keep the gripper out of what it must not press into (Push: the top of the box)."""
        return target

    def expert_continuous_action(self) -> np.ndarray:
        """The scripted expert's move as a continuous action (float32, in ``continuous_action_space``).

        By default the discrete expert's move, ``DIRECTIONS[expert_action()]`` (the same displacement, since
        discrete action ``i`` is the continuous action ``DIRECTIONS[i]``); Reach moves straight at the ball.
        """
        return DIRECTIONS[self.expert_action()].astype(np.float32)

    def _potential_info(self) -> dict[str, float]:
        """``{"potential": phi(state)}`` for an env with a ``potential()`` method (Reach), else nothing."""
        potential = getattr(self, "potential", None)
        return {} if potential is None else {"potential": potential()}

    def _move(self, direction: np.ndarray):
        before = self._potential_info()
        start = self.gripper_pos
        target = np.clip(start + direction * MAX_STEP_M, WORKSPACE_LOW, WORKSPACE_HIGH)
        target = self._limit_target(start, target)
        if self.simulate:
            # A cosine speed profile: the gripper starts and stops smoothly, which bounds the acceleration a
            # pushed box feels. Position and velocity are set before every substep (see the module docstring
            # for why the velocity matters).
            delta, duration = target - start, N_SUBSTEPS * TIMESTEP_S
            for k in range(N_SUBSTEPS):
                phase = np.pi * k / N_SUBSTEPS
                self._set_gripper(
                    start + delta * (1 - np.cos(phase)) / 2, delta * np.pi / (2 * duration) * np.sin(phase)
                )
                mujoco.mj_step(self.model, self.data)
        self._set_gripper(target)
        # mj_step leaves body positions (xpos) one substep old; rendering and rewards read them.
        mujoco.mj_forward(self.model, self.data)
        self.steps += 1
        success = self._solved()
        truncated = not success and self.steps >= self.max_steps
        info = {"success": success, **self._potential_info()}
        if before:  # for potential-based shaping (rewards.rules.PotentialShaping)
            info["previous_potential"] = before["potential"]
        return self._observation(), 1.0 if success else 0.0, success, truncated, info

    # -- to implement -----------------------------------------------------------------------------------
    def _reset_objects(self) -> None:
        """Place the gripper and the objects, drawing from ``self.np_random`` only."""
        raise NotImplementedError

    def _place(self, name: str, position: np.ndarray) -> None:
        """Put the thing called ``name`` (a key of ``reset_options``) at ``position``."""
        self._set_gripper(position)

    def _solved(self) -> bool:
        raise NotImplementedError

    def _state_words(self) -> str:
        """The state in words, for ``text_hint=True``."""
        raise NotImplementedError

    # -- truthful thoughts ------------------------------------------------------------------------------
    #: The move still to make as ``(object, reference)`` names of ``_thought_objects``.
    _thought_gap: ClassVar[tuple[str, str]]
    #: The axes a thought's offsets are checked on.
    _thought_axes: ClassVar[tuple[int, ...]] = (0, 1, 2)

    def _thought_objects(self) -> dict[str, tuple[str, np.ndarray]]:
        """Each object a thought may name: name -> (keyword alternation, position in metres)."""
        raise NotImplementedError

    def _check_task_claims(self, thoughts: str) -> tuple[bool, bool]:
        """The task's own claims (words without numbers): whether they are all true, and whether one of them
        states the move still to make."""
        return True, False

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` states the move still to make truly, and nothing false.

        See the class docstrings for the rules.
        """
        objects = self._thought_objects()
        tolerance = THOUGHT_TOLERANCE_CM

        def named(word: str | None) -> str | None:
            return next((name for name, (keys, _) in objects.items() if word and re.fullmatch(keys, word)), None)

        def gap_cm(subject: str, reference: str) -> np.ndarray:
            return 100 * (objects[subject][1] - objects[reference][1])

        true_so_far, states_gap = self._check_task_claims(thoughts)
        if not true_so_far:
            return False
        claimed: list[tuple[int, int]] = []
        for offset in find_offsets(thoughts, _THOUGHT_DIRECTIONS, _CM_UNIT):
            subject, reference = self._thought_gap
            if named(offset.reference) is not None:
                reference = named(offset.reference)
                others = {name: keys for name, (keys, _) in objects.items() if name != reference}
                default = subject if reference != subject else self._thought_gap[1]
                subject = keyword_before(thoughts, offset.start, others, window=8) or default
            if not any(_THOUGHT_DIRECTIONS[word][0] in self._thought_axes for word, _ in offset.parts):
                continue  # only heights, which Push does not check: the distances below still must be true
            truth = gap_cm(subject, reference)
            stated = set()
            for word, amount in offset.parts:
                axis, sign = _THOUGHT_DIRECTIONS[word]
                if axis in self._thought_axes:
                    stated.add(axis)
                    if abs(sign * amount - truth[axis]) > tolerance:
                        return False
            if any(abs(truth[axis]) > tolerance for axis in self._thought_axes if axis not in stated):
                return False
            states_gap = True
            claimed.append((offset.start, offset.end))
        for match in _WITHIN_HALF_CM.finditer(thoughts):
            if np.any(np.abs(gap_cm(*self._thought_gap)[list(self._thought_axes)]) > tolerance):
                return False
            states_gap = True
            claimed.append(match.span())
        positions = {name: (keys, 100 * position) for name, (keys, position) in objects.items()}
        for length in (2, 3):
            for found in find_tuples(thoughts, length):
                name = keyword_before(thoughts, found.start, {n: keys for n, (keys, _) in positions.items()})
                candidates = [positions[name][1]] if name is not None else [p for _, p in positions.values()]
                if not any(np.all(np.abs(np.array(found.value) - p[:length]) <= tolerance) for p in candidates):
                    return False
                claimed.append((found.start, found.end))
        if not states_gap:
            return False
        differences = [gap_cm(a, b) for a in objects for b in objects if a < b]
        lengths_cm = [np.linalg.norm(d[list(self._thought_axes)]) for d in differences]
        lengths_cm += [abs(v) for vector in differences + [p for _, p in positions.values()] for v in vector]
        for match in _DISTANCE_CM.finditer(thoughts):
            if not any(start <= match.start() < end for start, end in claimed):
                if not any(abs(float(match.group(1)) - length) <= tolerance for length in lengths_cm):
                    return False
                claimed.append(match.span())
        allowed = {self.steps, self.max_steps, self.max_steps - self.steps, round(100 * MAX_STEP_M)}
        return all(found.value in allowed for found in unclaimed_numbers(thoughts, claimed))

    # -- observation ------------------------------------------------------------------------------------
    def _text(self) -> str:
        text = f"Step {self.steps} of {self.max_steps}."
        if self.text_hint:
            text += " " + self._state_words() + " x is right, y is forward, z is up."
        return text

    def _image(self) -> np.ndarray:
        if self._renderer is None:
            if os.environ.get("MUJOCO_GL", "").lower() in ("disable", "disabled", "off", "false", "0"):
                raise RuntimeError(
                    f"{type(self).__name__}: MuJoCo rendering is disabled (MUJOCO_GL="
                    f"{os.environ['MUJOCO_GL']!r}; without MUJOCO_GL, vlmrl disables it where it finds neither "
                    "libEGL nor libOSMesa). Install one (apt install libegl1, or libosmesa6) or set MUJOCO_GL."
                )
            try:
                self._renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
            except mujoco.FatalError as error:
                raise RuntimeError(
                    f"{type(self).__name__}: MuJoCo could not open an offscreen OpenGL context "
                    f"(MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}). Set MUJOCO_GL=egl (or osmesa) before "
                    "anything imports mujoco, e.g. import envs first or export it in the shell."
                ) from error
            # Belt and braces with shadowsize="0": these flags are what the renderer checks per frame.
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._renderer.update_scene(self.data, camera="front")
        return self._renderer.render()

    # -- pickling: MjModel, MjData and the GL context do not travel; the XML and a state snapshot do -----
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("model", "data", "_renderer")}
        snapshot = np.empty(mujoco.mj_stateSize(self.model, _STATE_SPEC))
        mujoco.mj_getState(self.model, self.data, snapshot, _STATE_SPEC)
        state["_physics_state"] = snapshot
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        snapshot = state.pop("_physics_state")
        self.__dict__.update(state)
        self._build()
        mujoco.mj_setState(self.model, self.data, snapshot, _STATE_SPEC)
        mujoco.mj_forward(self.model, self.data)

    def _uniform(self, low: Any, high: Any) -> np.ndarray:
        return self.np_random.uniform(np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64))


class ReachEnv(TabletopEnv):
    """Move the gripper to a red ball over the table; reward 1 once within ``SUCCESS_RADIUS_M`` of it.

    The ball sits on a thin pole that stands on the table, so its height shows in the image. The gripper
    starts at a random point, the ball at another one at least ``MIN_START_DISTANCE_M`` away. Nothing in
    the scene moves but the gripper, so no physics is simulated.

    Truthful thoughts (``check_thoughts``, rules shared with Push in :class:`TabletopEnv`): a thought must
    state where the ball is from the gripper ("the ball is 7 cm right and 12 cm down of the gripper",
    "I must move 7 cm right and 12 cm down", "the gripper is 7 cm left and 12 cm up of the ball"); a
    "largest gap is <direction>" must name the axis of the largest gap (within the tolerance). The
    objects are named "gripper", "I", "me" and "ball", "target", "red".

    Example:
        >>> env = ReachEnv(image_size=64)
        >>> observation, info = env.reset(seed=0)
        >>> observation["image"].shape, info["success"]
        ((64, 64, 3), False)
        >>> env.close()
    """

    #: Gripper-to-ball distance (metres) that counts as reached. 4 cm moves can bring the gripper within
    #: 2 cm of any point along each axis, so within 3.5 cm; 4 cm leaves a margin.
    SUCCESS_RADIUS_M = 0.04
    MIN_START_DISTANCE_M = 0.1
    #: Upper gripper-to-ball distances (metres) of the progress captions' bands but the last: the first is
    #: the success radius, so "touching" means reached; the others split the expert's frames into bands of
    #: a few hundred frames each (distances 1 to 47 cm over 200 episodes).
    PROGRESS_BANDS_M = (SUCCESS_RADIUS_M, 0.08, 0.14, 0.22)
    TARGET_LOW = np.array([-0.17, -0.17, 0.05])
    TARGET_HIGH = np.array([0.17, 0.17, 0.18])

    language = LanguageSpec(
        instruction=(
            "You control the dark grey gripper above a table, seen from the front. Move it to the red "
            "ball. Left and right are as you see them, forward is away from you, backward is towards you, "
            "up and down are vertical. The dark square on the table is right below the gripper and the ball "
            "stands on a pole: compare where they meet the table to tell forward from up."
        ),
        action_names=ACTION_NAMES,
        progress_captions=(
            "the gripper is touching the red ball",
            "the gripper is very near the red ball",
            "the gripper is near the red ball",
            "the gripper is far from the red ball",
            "the gripper is very far from the red ball",
        ),
    )
    simulate = False
    default_max_steps = 50
    reset_options: ClassVar[dict[str, int]] = {"gripper": 3, "target": 3}
    objects_xml = """
    <body name="target" mocap="true" pos="0.1 0.1 0.1">
      <geom name="target" type="sphere" size="0.02" rgba="0.9 0.15 0.1 1" contype="0" conaffinity="0"/>
      <geom name="target_pole" type="cylinder" fromto="0 0 0 0 0 -0.5" size="0.004" rgba="0.45 0.45 0.45 1"
            contype="0" conaffinity="0"/>
    </body>
    """

    def _build(self) -> None:
        super()._build()
        self._target_mocap = self._mocap_id("target")

    @property
    def target_pos(self) -> np.ndarray:
        """Ball centre (x, y, z) in metres (a copy)."""
        return self.data.mocap_pos[self._target_mocap].copy()

    def _reset_objects(self) -> None:
        target = self._uniform(self.TARGET_LOW, self.TARGET_HIGH)
        while True:
            gripper = self._uniform(WORKSPACE_LOW, WORKSPACE_HIGH)
            if np.linalg.norm(gripper - target) >= self.MIN_START_DISTANCE_M:
                break
        self.data.mocap_pos[self._target_mocap] = target
        self._set_gripper(gripper)

    def _place(self, name: str, position: np.ndarray) -> None:
        if name == "target":
            self.data.mocap_pos[self._target_mocap] = position
        else:
            super()._place(name, position)

    def _solved(self) -> bool:
        return bool(np.linalg.norm(self.target_pos - self.gripper_pos) <= self.SUCCESS_RADIUS_M)

    def potential(self) -> float:
        """Minus the gripper-to-ball distance in metres, for potential-based shaping (each step's info
        carries it as ``potential``, and ``previous_potential`` before the move)."""
        return -float(np.linalg.norm(self.target_pos - self.gripper_pos))

    def progress_caption(self) -> str:
        """How near the gripper is to the ball, in the words of ``language.progress_captions`` (bands of
        ``PROGRESS_BANDS_M``; a distance on an edge belongs to the nearer band)."""
        distance = float(np.linalg.norm(self.target_pos - self.gripper_pos))
        band = int(np.searchsorted(self.PROGRESS_BANDS_M, distance, side="left"))
        return self.language.progress_captions[band]

    def _state_words(self) -> str:
        return f"Gripper at {_cm(self.gripper_pos)}, ball at {_cm(self.target_pos)}."

    _thought_gap = ("ball", "gripper")

    def _thought_objects(self) -> dict[str, tuple[str, np.ndarray]]:
        return {"gripper": (_GRIPPER_WORDS, self.gripper_pos), "ball": (r"ball|target|red|sphere", self.target_pos)}

    def _check_task_claims(self, thoughts: str) -> tuple[bool, bool]:
        gap_cm = 100 * (self.target_pos - self.gripper_pos)
        for match in _LARGEST_GAP.finditer(thoughts):
            axis, sign = _THOUGHT_DIRECTIONS[match.group(1).lower()]
            if sign * gap_cm[axis] < np.abs(gap_cm).max() - THOUGHT_TOLERANCE_CM:
                return False, False
        return True, False

    def expert_action(self) -> int:
        """Move along the axis with the largest remaining gap to the ball."""
        gap = self.target_pos - self.gripper_pos
        axis = int(np.argmax(np.abs(gap)))
        return action_along(axis, gap[axis])

    def expert_continuous_action(self) -> np.ndarray:
        """Straight at the ball: the gap in units of ``MAX_STEP_M``, each axis clipped to [-1, 1] (a gap of
        under 4 cm along an axis is closed in one step)."""
        gap = self.target_pos - self.gripper_pos
        return np.clip(gap / MAX_STEP_M, -1.0, 1.0).astype(np.float32)

    def expert_rationale(self) -> str:
        gap = self.target_pos - self.gripper_pos
        action = ACTION_NAMES[self.expert_action()]
        return (
            f"The ball is {_gap_words(gap)} of the gripper; the largest gap is {action.removeprefix('move ')}, "
            f"so I {action}."
        )


class PushEnv(TabletopEnv):
    """Push a blue box into the green disk; reward 1 once the box centre is within the disk.

    The box (a free body) starts on the table at random, the disk at least ``MIN_START_DISTANCE_M`` from
    it, the gripper at a random point above the box's height. The gripper cannot be pressed down into the
    top of the box (it stops on it): squeezing a box between a kinematic gripper and the table would
    launch it.

    Truthful thoughts (``check_thoughts``, rules shared with Reach in :class:`TabletopEnv`): a thought must
    state where the disk is from the box ("the disk is 8 cm right and 4 cm backward of the box"), or the
    way to push the box ("push the box right", "push it forward": the disk must lie that way from the
    box). Offsets are checked on the table plane only: an "up" or "down" in them is skipped, and a height
    alone ("the gripper is 13 cm above the box") need only be one of the scene's distances. "The gripper
    is 3 cm left of the box" is read as the gripper seen from the box. The objects are named "gripper",
    "I", "me", "box", "block", "blue" and "disk", "goal", "green"; words such as "behind" or "lined up"
    are not checked.

    Example:
        >>> env = PushEnv(image_size=64)
        >>> observation, info = env.reset(seed=0)
        >>> observation["image"].shape, info["success"]
        ((64, 64, 3), False)
        >>> env.close()
    """

    BOX_HALF_M = 0.025
    GOAL_RADIUS_M = 0.05
    MIN_START_DISTANCE_M = 0.1
    #: Box and disk centres start within these xy bounds, well inside the gripper's reach, so that the
    #: gripper can get behind the box on every side.
    OBJECT_LOW = np.array([-0.1, -0.1])
    OBJECT_HIGH = np.array([0.1, 0.1])

    # The expert's geometry (metres). Gripper centre heights: at or below PUSH_Z the gripper pushes the
    # box low down; at or above SAFE_Z it passes over the box with a centimetre to spare.
    _PUSH_Z = 0.045
    _SAFE_Z = BOX_HALF_M * 2 + GRIPPER_HALF_M[2] + 0.01
    # Line up with the box within half a move; finish an axis within 3 cm (both axes within 3 cm puts the
    # box within 4.3 cm of the disk centre, inside the 5 cm disk).
    _ALIGN_M = MAX_STEP_M / 2 + 1e-6
    # A push under way goes on while the box centre stays in front of the gripper's face (a box drifts a
    # few millimetres sideways as it goes): stopping to line up again for every drift wastes steps.
    _KEEP_PUSHING_ALIGN_M = 0.027
    _AXIS_DONE_M = 0.03

    language = LanguageSpec(
        instruction=(
            "You control the dark grey gripper above a table, seen from the front. Push the blue box into "
            "the green disk. Left and right are as you see them, forward is away from you, backward is "
            "towards you, up and down are vertical. The dark square on the table is right below the "
            "gripper. Lift the gripper to pass over the box, lower it beside the box, then push."
        ),
        action_names=ACTION_NAMES,
    )
    reset_options: ClassVar[dict[str, int]] = {"gripper": 3, "box": 2, "goal": 2}
    objects_xml = f"""
    <body name="box" pos="0 0 {BOX_HALF_M}">
      <freejoint name="box"/>
      <geom name="box" type="box" size="{BOX_HALF_M} {BOX_HALF_M} {BOX_HALF_M}" rgba="0.15 0.35 0.9 1" friction="0.5 0.005 0.0001"
            contype="3" conaffinity="3"/>
    </body>
    <body name="goal" mocap="true" pos="0 0 0.001">
      <geom name="goal" type="cylinder" size="{GOAL_RADIUS_M} 0.0008" rgba="0.2 0.75 0.3 1"
            contype="0" conaffinity="0"/>
    </body>
    """

    def _build(self) -> None:
        super()._build()
        self._goal_mocap = self._mocap_id("goal")
        self._box_qpos = int(self.model.jnt_qposadr[self.model.joint("box").id])
        self._box_body = int(self.model.body("box").id)

    @property
    def box_pos(self) -> np.ndarray:
        """Box centre (x, y, z) in metres (a copy)."""
        return self.data.qpos[self._box_qpos : self._box_qpos + 3].copy()

    @property
    def goal_pos(self) -> np.ndarray:
        """Disk centre (x, y, z) in metres (a copy)."""
        return self.data.mocap_pos[self._goal_mocap].copy()

    def _box_half_extents(self) -> np.ndarray:
        """Half sizes (x, y, z) of the box's axis-aligned bounding box: more than ``BOX_HALF_M`` once it has
        turned (or tipped onto another face)."""
        rotation = self.data.xmat[self._box_body].reshape(3, 3)
        return self.BOX_HALF_M * np.abs(rotation).sum(axis=1)

    def _reset_objects(self) -> None:
        box = self._uniform(self.OBJECT_LOW, self.OBJECT_HIGH)
        while True:
            goal = self._uniform(self.OBJECT_LOW, self.OBJECT_HIGH)
            if np.linalg.norm(goal - box) >= self.MIN_START_DISTANCE_M:
                break
        self.data.qpos[self._box_qpos : self._box_qpos + 3] = (box[0], box[1], self.BOX_HALF_M)
        self.data.mocap_pos[self._goal_mocap] = (goal[0], goal[1], 0.001)
        self._set_gripper(self._uniform((WORKSPACE_LOW[0], WORKSPACE_LOW[1], self._SAFE_Z), WORKSPACE_HIGH))

    def _place(self, name: str, position: np.ndarray) -> None:
        if name == "box":
            self.data.qpos[self._box_qpos : self._box_qpos + 3] = (position[0], position[1], self.BOX_HALF_M)
        elif name == "goal":
            self.data.mocap_pos[self._goal_mocap] = (position[0], position[1], 0.001)
        else:
            super()._place(name, position)

    def _limit_target(self, start: np.ndarray, target: np.ndarray) -> np.ndarray:
        box, half = self.box_pos, self._box_half_extents()
        if np.all(np.abs(target[:2] - box[:2]) < half[:2] + GRIPPER_HALF_M[:2]):
            rest_z = box[2] + half[2] + GRIPPER_HALF_M[2] + 0.002
            # Only stop a descent onto the box; a gripper already lower (beside the box) stays free to move.
            target[2] = max(target[2], min(start[2], rest_z))
        return target

    def _solved(self) -> bool:
        return bool(np.linalg.norm(self.box_pos[:2] - self.goal_pos[:2]) <= self.GOAL_RADIUS_M)

    def _state_words(self) -> str:
        return f"Gripper at {_cm(self.gripper_pos)}, box at {_cm(self.box_pos[:2])}, disk at {_cm(self.goal_pos[:2])}."

    # -- expert -----------------------------------------------------------------------------------------
    def _plan(self) -> tuple[int, str]:
        """The expert's action and the reason for it, from the current state alone.

        Push the box along one axis at a time, the one with the larger box-to-disk gap first: lift, pass
        over the box to its far side from the disk, line up, lower, push. A push in progress goes on until
        its axis is done, even if the other gap has become larger.
        """
        gripper, box = self.gripper_pos, self.box_pos
        gap = self.goal_pos[:2] - box[:2]
        contact = self._box_half_extents()[:2] + GRIPPER_HALF_M[:2]
        low = gripper[2] <= self._PUSH_Z

        def behind(axis: int) -> float:
            """How far the gripper centre is behind the box centre, on the side away from the disk."""
            return float(np.sign(gap[axis]) * (box[axis] - gripper[axis]))

        for axis in (0, 1):
            other = 1 - axis
            pushing = (
                low
                and behind(axis) >= contact[axis] - 0.01
                and abs(gripper[other] - box[other]) <= self._KEEP_PUSHING_ALIGN_M
            )
            if pushing and abs(gap[axis]) > self._AXIS_DONE_M:
                return self._push(axis, gap)

        axis = int(np.argmax(np.abs(gap)))
        other, sign = 1 - axis, np.sign(gap[axis])
        way = _direction_word(axis, sign)
        misaligned = abs(gripper[other] - box[other]) > self._ALIGN_M
        if behind(axis) >= contact[axis] + 0.003:
            if misaligned:
                action = action_along(other, box[other] - gripper[other])
                return action, f"To push the box {way} I line the gripper up behind it: I {ACTION_NAMES[action]}."
            if not low:
                return action_along(2, -1), f"The gripper is lined up behind the box; I lower it to push the box {way}."
            return self._push(axis, gap)
        if low and behind(axis) >= contact[axis] - 0.01:
            return (
                action_along(axis, -sign),
                f"The gripper touches the box but is not lined up to push it {way}; I back off first.",
            )
        if gripper[2] < self._SAFE_Z:
            return action_along(2, 1), f"I must get behind the box to push it {way}; I lift the gripper over it."
        action = action_along(axis, -sign)
        return action, f"I must get behind the box to push it {way}; the gripper is high, so I {ACTION_NAMES[action]}."

    _thought_gap = ("disk", "box")
    _thought_axes = (0, 1)

    def _thought_objects(self) -> dict[str, tuple[str, np.ndarray]]:
        return {
            "gripper": (_GRIPPER_WORDS, self.gripper_pos),
            "box": (r"box|block|cube|blue", self.box_pos),
            "disk": (r"disk|disc|goal|green|target", self.goal_pos),
        }

    def _check_task_claims(self, thoughts: str) -> tuple[bool, bool]:
        gap = self.goal_pos - self.box_pos
        matches = list(_PUSH_DIRECTION.finditer(thoughts))
        for match in matches:
            axis, sign = _THOUGHT_DIRECTIONS[match.group(1).lower()]
            if axis == 2 or sign * gap[axis] <= 0:
                return False, False  # pushing up or down, or away from the disk
        return True, bool(matches)

    def _push(self, axis: int, gap: np.ndarray) -> tuple[int, str]:
        action = action_along(axis, gap[axis])
        return action, (
            f"The disk is {_gap_words(np.append(gap, 0.0))} of the box and the gripper is behind it, "
            f"so I {ACTION_NAMES[action]} to push it."
        )

    def expert_action(self) -> int:
        """The scripted pusher's action (see :meth:`_plan`)."""
        return self._plan()[0]

    def expert_rationale(self) -> str:
        return self._plan()[1]
