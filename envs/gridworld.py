"""A grid world seen from above: walk the blue circle to the green square around dark grey walls.

The image is drawn cell by cell with flat colours and no antialiasing, so with the default ``cell_px=16``
one cell is exactly one 16x16 ViT patch. Coordinates are ``(row, column)`` with row 0 at the top.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import numpy as np
from gymnasium import spaces

from envs.base import LanguageEnv, observation_space
from envs.language import LanguageSpec
from envs.thoughts import find_cells, find_offsets, keyword_before, unclaimed_numbers

#: (row, column) change of each action, in the order of ``GridWorldEnv.language.action_names``.
MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))

BACKGROUND_RGB = (238, 238, 238)
GRID_LINE_RGB = (180, 180, 180)
WALL_RGB = (64, 64, 64)
GOAL_RGB = (40, 170, 60)
AGENT_RGB = (30, 80, 220)

# How a thought states where the goal is: "N [cells] [to the] direction", measured from the agent unless
# followed by "of/from the goal" (then it is the agent's place seen from the goal).
# Each direction word as (axis, sign), axis 0 the row and 1 the column.
_DIRECTIONS = {"down": (0, 1), "below": (0, 1), "up": (0, -1), "above": (0, -1), "right": (1, 1), "left": (1, -1)}
_CELL_UNITS = r"cells?|squares?|spaces?|tiles?"
_GOAL_WORDS = r"goal|green|target|square"
_CELL_KEYWORDS = {"agent": r"i|i'm|me|my|agent|circle|blue|you|you're", "goal": _GOAL_WORDS, "wall": r"walls?|gr[ae]y"}
# "N moves" or "N steps" is the length of the shortest path, unless it counts the steps left.
_PATH_LENGTH = re.compile(r"(?<![\w.-])(\d+)\s+(?:moves?|steps?)\b(?!\s+(?:left|remaining|to\s+spare))", re.IGNORECASE)
_FIRST_MOVE = re.compile(
    r"\b(?:starts?|starting|begins?|first\s+(?:move|step)(?:\s+is)?)\s+(?:with\s+|by\s+)?"
    r"(?:moving\s+|going\s+|a\s+move\s+|a\s+step\s+)?(?:to\s+the\s+)?(up|down|left|right)\b",
    re.IGNORECASE,
)

# A layout is rejected and drawn again when the goal is unreachable; past this many draws the settings
# (many walls in a small grid) almost never give a solvable layout, and we say so instead of looping.
_MAX_LAYOUT_DRAWS = 1_000


def bfs_distances(walls: np.ndarray, goal: tuple[int, int]) -> np.ndarray:
    """Moves from every cell to ``goal`` (-1 where the goal cannot be reached or the cell is a wall).

    >>> walls = np.zeros((2, 3), dtype=bool); walls[0, 1] = True
    >>> bfs_distances(walls, (0, 2)).tolist()
    [[4, -1, 0], [3, 2, 1]]
    """
    rows, cols = walls.shape
    distances = np.full((rows, cols), -1, dtype=np.int64)
    distances[goal] = 0
    queue = deque([goal])
    while queue:
        row, col = queue.popleft()
        for d_row, d_col in MOVES:
            r, c = row + d_row, col + d_col
            if 0 <= r < rows and 0 <= c < cols and not walls[r, c] and distances[r, c] < 0:
                distances[r, c] = distances[row, col] + 1
                queue.append((r, c))
    return distances


def describe_offset(d_row: int, d_col: int) -> str:
    """Where a cell lies relative to another, in words.

    >>> describe_offset(1, 2)
    '2 cells right and 1 cell down'
    >>> describe_offset(-3, 0)
    '3 cells up'
    """
    parts = []
    if d_col:
        parts.append(f"{abs(d_col)} cell{'s' if abs(d_col) > 1 else ''} {'right' if d_col > 0 else 'left'}")
    if d_row:
        parts.append(f"{abs(d_row)} cell{'s' if abs(d_row) > 1 else ''} {'down' if d_row > 0 else 'up'}")
    return " and ".join(parts) or "here"


class GridWorldEnv(LanguageEnv):
    """Walk to the goal on an ``size`` x ``size`` grid.

    Actions are ``up``, ``down``, ``left``, ``right``; moving into a wall or the border leaves the agent
    where it is. Reaching the goal gives reward 1 and ends the episode; every other step gives
    ``-step_penalty``. The environment truncates after ``max_steps`` steps. Every layout is solvable
    within ``max_steps`` (checked with a breadth-first search; unsolvable layouts are drawn again).

    Args:
        render_mode: Only ``"rgb_array"`` (or ``None``).
        size: Cells per side, at least 2.
        n_walls: Wall cells placed at random (never on the start or the goal).
        random_start: Start in a random free cell; otherwise in the top-left corner.
        random_goal: Put the goal in a random free cell; otherwise in the bottom-right corner.
        max_steps: Steps before truncation; defaults to ``4 * size``.
        cell_px: Pixels per cell side; the image is ``size * cell_px`` pixels square.
        step_penalty: Cost of each step that does not reach the goal (non-negative).
        text_hint: Also state the agent, goal and wall cells in the step text (an ablation: by default
            the text gives only the step count, and the positions must be read from the image).
        distance_reward: Weight of distance shaping: each move earns ``distance_reward`` times the
            decrease of the shortest-path distance to the goal (0, the default, for the sparse reward only).
            Potential-based only for an undiscounted return; the ``shaping`` reward module
            (``rewards/rules.py``) applies the discount, reading :meth:`potential` from the step info.

    Truthful thoughts (``check_thoughts``): a thought must say where the goal is, either as an offset from
    the agent ("the goal is 2 cells right and 1 cell up"; a direction left out means no offset that way;
    "I am 2 cells left of the goal" is read from the goal) or as both cells, written "(row, column)" or
    "row 2, column 3" and counted from 1 at the top left as in the step text ("I am at (1, 1), the goal
    at (2, 3)"). On the goal, it must say so ("I am on the goal"). If stated, these must be right too:
    each cell after "I", "goal" or "wall" (a cell with no such keyword must be the agent's, the goal's
    or a wall's), "N moves" or "N steps" as the shortest path's length, and the first move ("starts up")
    as a first move of a shortest path. Every other number must be a step count, the step limit, the grid
    size, the number of walls, the path length or an offset.

    Example:
        >>> env = GridWorldEnv(size=4, n_walls=2)
        >>> observation, info = env.reset(seed=0)
        >>> observation["image"].shape, info["success"]
        ((64, 64, 3), False)
    """

    language = LanguageSpec(
        instruction=(
            "You control the blue circle in a grid world seen from above. Move it to the green square. "
            "Dark grey cells are walls: moving into a wall or off the grid leaves the circle where it is."
        ),
        action_names=("up", "down", "left", "right"),
    )

    def __init__(
        self,
        render_mode: str | None = "rgb_array",
        size: int = 5,
        n_walls: int = 3,
        random_start: bool = True,
        random_goal: bool = True,
        max_steps: int | None = None,
        cell_px: int = 16,
        step_penalty: float = 0.0,
        text_hint: bool = False,
        distance_reward: float = 0.0,
    ) -> None:
        super().__init__(render_mode)
        if not isinstance(size, (int, np.integer)) or size < 2:
            raise ValueError(f"GridWorldEnv: size={size!r}; use an integer of at least 2 cells per side.")
        max_walls = (size * size - 2) // 2
        if not isinstance(n_walls, (int, np.integer)) or not 0 <= n_walls <= max_walls:
            raise ValueError(
                f"GridWorldEnv: n_walls={n_walls!r}; use an integer from 0 to {max_walls} for size={size} "
                "(at most half the free cells, so that solvable layouts are easy to draw)."
            )
        if max_steps is None:
            max_steps = 4 * size
        if not isinstance(max_steps, (int, np.integer)) or max_steps < 2 * (size - 1):
            raise ValueError(
                f"GridWorldEnv: max_steps={max_steps!r}; use an integer of at least {2 * (size - 1)} "
                f"(the corner-to-corner distance of a {size}x{size} grid), or None for 4 * size."
            )
        if not isinstance(cell_px, (int, np.integer)) or cell_px < 4:
            raise ValueError(f"GridWorldEnv: cell_px={cell_px!r}; use an integer of at least 4 pixels per cell.")
        if not np.isfinite(step_penalty) or step_penalty < 0:
            raise ValueError(
                f"GridWorldEnv: step_penalty={step_penalty!r}; use a finite non-negative cost (0 for none)."
            )
        self.size = int(size)
        self.n_walls = int(n_walls)
        self.random_start = bool(random_start)
        self.random_goal = bool(random_goal)
        self.max_steps = int(max_steps)
        self.cell_px = int(cell_px)
        self.step_penalty = float(step_penalty)
        self.text_hint = bool(text_hint)
        if not np.isfinite(distance_reward) or distance_reward < 0:
            raise ValueError(
                f"GridWorldEnv: distance_reward={distance_reward!r}; use a finite non-negative weight (0 for none)."
            )
        self.distance_reward = float(distance_reward)

        side = self.size * self.cell_px
        self.observation_space = observation_space(side, side)
        self.action_space = spaces.Discrete(len(MOVES))

        # Until the first reset: an empty grid, so render() and the expert work on a fresh env.
        self.walls = np.zeros((self.size, self.size), dtype=bool)
        self.agent = (0, 0)
        self.goal = (self.size - 1, self.size - 1)
        self.steps = 0
        self._distances = bfs_distances(self.walls, self.goal)
        self._background = self._draw_background()

    # -- gymnasium API ----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Draw a new solvable layout.

        Args:
            seed: Seeds ``self.np_random`` (as in every Gymnasium env).
            options: Optional fixed parts of the layout, for tests and hand-made evaluations:
                ``"agent"`` and ``"goal"`` as ``(row, column)``, ``"walls"`` as a list of cells (it replaces
                the random walls). Parts not given are drawn as usual; a random wall under a given agent
                or goal is dropped. Raises ``ValueError`` if the given layout cannot be solved.
        """
        super().reset(seed=seed)
        n_cells = self.size * self.size
        for _ in range(_MAX_LAYOUT_DRAWS):
            cells = [divmod(int(i), self.size) for i in self.np_random.permutation(n_cells)]
            fixed_start = None if self.random_start else (0, 0)
            goal = next(c for c in cells if c != fixed_start) if self.random_goal else (self.size - 1, self.size - 1)
            start = next(c for c in cells if c != goal) if self.random_start else fixed_start
            walls = np.zeros((self.size, self.size), dtype=bool)
            for cell in [c for c in cells if c not in (start, goal)][: self.n_walls]:
                walls[cell] = True
            distances = bfs_distances(walls, goal)
            if 0 < distances[start] <= self.max_steps:
                break
        else:
            raise RuntimeError(
                f"GridWorldEnv: no solvable layout in {_MAX_LAYOUT_DRAWS} draws with size={self.size}, "
                f"n_walls={self.n_walls}, max_steps={self.max_steps}; use fewer walls or more steps."
            )
        if options:
            walls, start, goal = self._layout_from_options(options, walls, start, goal)
            distances = bfs_distances(walls, goal)
            if distances[start] < 0:
                raise ValueError(f"GridWorldEnv: reset options {options!r} make the goal unreachable; move a wall.")
        self.walls, self.agent, self.goal, self.steps = walls, start, goal, 0
        self._distances = distances
        self._background = self._draw_background()
        return self._observation(), {"success": False, "potential": self.potential()}

    def _layout_from_options(
        self, options: dict[str, Any], walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int]
    ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        unknown = set(options) - {"agent", "goal", "walls"}
        if unknown:
            raise ValueError(f"GridWorldEnv: unknown reset options {sorted(unknown)}; use 'agent', 'goal', 'walls'.")

        def cell(value: Any, name: str) -> tuple[int, int]:
            row, col = (int(v) for v in value)
            if not (0 <= row < self.size and 0 <= col < self.size):
                raise ValueError(
                    f"GridWorldEnv: {name} cell {tuple(value)} is off the {self.size}x{self.size} grid; "
                    f"rows and columns go from 0 to {self.size - 1}."
                )
            return row, col

        start = cell(options["agent"], "agent") if "agent" in options else start
        goal = cell(options["goal"], "goal") if "goal" in options else goal
        if start == goal:
            raise ValueError(f"GridWorldEnv: agent and goal are both at {start}; put them in different cells.")
        if "walls" in options:
            walls = np.zeros((self.size, self.size), dtype=bool)
            for value in options["walls"]:
                wall = cell(value, "wall")
                if wall in (start, goal):
                    raise ValueError(f"GridWorldEnv: wall at {wall} is on the agent or the goal; move it.")
                walls[wall] = True
        else:
            walls = walls.copy()
            walls[start] = walls[goal] = False
        return walls, start, goal

    def step(self, action: Any):
        action = self._check_action(action)
        distance_before = self._distances[self.agent]
        potential_before = self.potential()
        d_row, d_col = MOVES[action]
        row, col = self.agent[0] + d_row, self.agent[1] + d_col
        if 0 <= row < self.size and 0 <= col < self.size and not self.walls[row, col]:
            self.agent = (row, col)
        self.steps += 1
        success = self.agent == self.goal
        reward = 1.0 if success else -self.step_penalty
        # Distance shaping w * (d - d'): potential-based (Ng, Harada & Russell 1999) only for an undiscounted
        # return, since it lacks the gamma on phi(s') and does not zero phi at the goal (where d' = 0 anyway).
        # For discounted returns use the ``shaping`` reward module (rewards/rules.py), which reads the
        # potentials below. Off by default.
        reward += self.distance_reward * float(distance_before - self._distances[self.agent])
        truncated = not success and self.steps >= self.max_steps
        info = {"success": success, "previous_potential": potential_before, "potential": self.potential()}
        return self._observation(), reward, success, truncated, info

    def potential(self) -> float:
        """Minus the shortest-path distance (moves) from the agent to the goal: 0 on the goal, lower further
        away. Each step's info carries it (``potential``, and ``previous_potential`` before the move) for
        potential-based shaping (``rewards.rules.PotentialShaping``).

        >>> env = GridWorldEnv(size=4)
        >>> _ = env.reset(seed=0, options={"agent": (0, 0), "goal": (2, 3), "walls": []})
        >>> env.potential()
        -5.0
        """
        return -float(self._distances[self.agent])

    # -- expert -----------------------------------------------------------------------------------------
    def expert_action(self) -> int:
        """The first move of a shortest path to the goal (ties go to the earliest of up, down, left, right).

        At the goal, or where the goal is unreachable (only possible before the first reset), returns 0.
        """
        here = self._distances[self.agent]
        for action, (d_row, d_col) in enumerate(MOVES):
            row, col = self.agent[0] + d_row, self.agent[1] + d_col
            if 0 <= row < self.size and 0 <= col < self.size and self._distances[row, col] == here - 1 >= 0:
                return action
        return 0

    def expert_rationale(self) -> str:
        """Where the goal is and how the shortest path starts."""
        d_row, d_col = self.goal[0] - self.agent[0], self.goal[1] - self.agent[1]
        moves = int(self._distances[self.agent])
        if moves <= 0:
            return "I am on the goal already."
        detour = moves > abs(d_row) + abs(d_col)
        path = "the shortest path around the walls" if detour else "the shortest path"
        return (
            f"The goal is {describe_offset(d_row, d_col)}; {path} takes {moves} move{'s' if moves > 1 else ''} "
            f"and starts {self.language.action_names[self.expert_action()]}."
        )

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` states where the goal is truly, and nothing false.

        See the class docstring for the rules.

        >>> env = GridWorldEnv()
        >>> _ = env.reset(seed=0, options={"agent": (3, 1), "goal": (2, 3), "walls": []})
        >>> env.expert_rationale()
        'The goal is 2 cells right and 1 cell up; the shortest path takes 3 moves and starts up.'
        >>> env.check_thoughts(env.expert_rationale())
        True
        >>> env.check_thoughts("I am at (4, 2) and the goal is at row 3, column 4: go UP first.")
        True
        >>> env.check_thoughts("The goal is 2 cells right."), env.check_thoughts("Up.")
        (False, False)
        """
        d_row, d_col = self.goal[0] - self.agent[0], self.goal[1] - self.agent[1]
        offsets = find_offsets(thoughts, _DIRECTIONS, _CELL_UNITS)
        for offset in offsets:
            # A reference to the goal ("2 cells left of the goal") states the agent's place seen from it.
            sign = -1 if offset.reference is not None and re.fullmatch(_GOAL_WORDS, offset.reference) else 1
            stated = {0: False, 1: False}
            for word, amount in offset.parts:
                axis, direction = _DIRECTIONS[word]
                stated[axis] = True
                if sign * direction * amount != (d_row, d_col)[axis]:
                    return False
            if any(not stated[axis] and (d_row, d_col)[axis] != 0 for axis in (0, 1)):
                return False
        claimed = [(offset.start, offset.end) for offset in offsets]
        cells = {"agent": False, "goal": False}
        for found in find_cells(thoughts):
            cell = (found.value[0] - 1, found.value[1] - 1)  # the step text counts from 1
            role = keyword_before(thoughts, found.start, _CELL_KEYWORDS)
            on_grid = 0 <= cell[0] < self.size and 0 <= cell[1] < self.size
            truths = {"agent": cell == self.agent, "goal": cell == self.goal, "wall": on_grid and self.walls[cell]}
            if not (truths[role] if role is not None else any(truths.values())):
                return False
            if role in cells:
                cells[role] = True
            claimed.append((found.start, found.end))
        moves = int(self._distances[self.agent])
        for match in _PATH_LENGTH.finditer(thoughts):
            if not any(start <= match.start() < end for start, end in claimed):
                if int(match.group(1)) != moves:
                    return False
                claimed.append(match.span())
        for match in _FIRST_MOVE.finditer(thoughts):
            d_move_row, d_move_col = MOVES[self.language.action_names.index(match.group(1).lower())]
            row, col = self.agent[0] + d_move_row, self.agent[1] + d_move_col
            on_grid = 0 <= row < self.size and 0 <= col < self.size
            if not (on_grid and self._distances[row, col] == moves - 1 >= 0):
                return False
        if self.agent == self.goal:
            if not re.search(r"\b(?:on|at|reached)\s+the\s+goal\b", thoughts, re.IGNORECASE):
                return False
        elif not offsets and not (cells["agent"] and cells["goal"]):
            return False
        allowed = {
            self.steps,
            self.max_steps,
            self.max_steps - self.steps,
            self.size,
            self.n_walls,
            moves,
            abs(d_row),
            abs(d_col),
            abs(d_row) + abs(d_col),
        }
        return all(found.value in allowed for found in unclaimed_numbers(thoughts, claimed))

    # -- observation ------------------------------------------------------------------------------------
    def _text(self) -> str:
        text = f"Step {self.steps} of {self.max_steps}."
        if self.text_hint:
            walls = ", ".join(f"({r + 1}, {c + 1})" for r, c in np.argwhere(self.walls)) or "none"
            text += (
                f" Cells are (row, column), counted from 1 at the top left. You are at "
                f"({self.agent[0] + 1}, {self.agent[1] + 1}); the goal is at ({self.goal[0] + 1}, "
                f"{self.goal[1] + 1}); walls: {walls}."
            )
        return text

    def _cell(self, image: np.ndarray, row: int, col: int) -> np.ndarray:
        """The pixels of one cell (a view into ``image``)."""
        px = self.cell_px
        return image[row * px : (row + 1) * px, col * px : (col + 1) * px]

    def _draw_background(self) -> np.ndarray:
        """Everything but the agent: grid, walls and goal (drawn once per episode)."""
        px, side = self.cell_px, self.size * self.cell_px
        image = np.empty((side, side, 3), dtype=np.uint8)
        image[:] = BACKGROUND_RGB
        # A one-pixel frame around every cell, so that each cell (each ViT patch) looks the same.
        for k in range(self.size):
            for edge in (k * px, (k + 1) * px - 1):
                image[edge, :] = GRID_LINE_RGB
                image[:, edge] = GRID_LINE_RGB
        for row, col in np.argwhere(self.walls):
            self._cell(image, row, col)[:] = WALL_RGB
        margin = max(1, px // 8)
        self._cell(image, *self.goal)[margin:-margin, margin:-margin] = GOAL_RGB
        return image

    def _image(self) -> np.ndarray:
        image = self._background.copy()
        # A filled circle with hard edges: a pixel is in when its centre is, so no blur crosses cells.
        centre = (self.cell_px - 1) / 2
        offsets = np.arange(self.cell_px) - centre
        inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= (0.36 * self.cell_px) ** 2
        self._cell(image, *self.agent)[inside] = AGENT_RGB
        return image
