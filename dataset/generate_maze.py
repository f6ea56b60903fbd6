"""Generate square mazes with a unique shortest path, as CSV files the Maze builder reads.

    python dataset/generate_maze.py --output-dir data/maze-gen --num-train 1000 --num-test 1000 --size 30

Design choices:
- Corridors are grown as a random tree of open cells over the whole grid: a wall cell may open
  only if exactly one of its 4-neighbours is open, so the open cells always form a tree (one
  path between any two cells). The frontier cell is taken from the newest branch with
  probability `--corridor-bias` and at random otherwise: high values give long winding
  corridors (long paths), low values many short dead ends.
- `--loops` extra wall cells between corridors are then opened, so there are alternative
  routes and the shortest path is no longer trivially the only path.
- Start S and goal G: a double BFS finds a far-out cell A (rejecting mazes too small for the
  requested length); S is drawn among the cells at distance >= `--min-path-length` from A, and
  G among the cells at distance >= `--min-path-length` from S that are reached by exactly one
  shortest path (BFS counts shortest paths, capped at 2). The label marks that path's cells,
  S and G excluded, with `o`.
- Path length (the CSV `rating`) = number of moves from S to G = number of `o` cells + 1.
  The default minimum 101 makes every maze "hard" (more than 100 path cells however counted).

Charset as the reference's Maze data: `#` wall, ` ` open, `S` start, `G` goal, `o` path.
"""

import random
import sys
from collections import deque
from functools import cache, partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python dataset/generate_maze.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel, Field  # noqa: E402

from dataset.cli import run_cli  # noqa: E402
from dataset.generation import CSV_FILES, generate_splits  # noqa: E402

WALL, OPEN, START, GOAL, PATH = "#", " ", "S", "G", "o"


class GenerateMazeConfig(BaseModel):
    """Generate square mazes with a unique shortest path into train.csv and test.csv."""

    output_dir: str = Field("data/maze-generated", description="folder for train.csv and test.csv")
    num_train: int = Field(1000, description="mazes in train.csv")
    num_test: int = Field(1000, description="mazes in test.csv")
    seed: int = Field(0, ge=0, description="master seed; maze i of a split uses its own derived seed")
    size: int = Field(30, description="side of the square grid")
    min_path_length: int = Field(101, description="minimum number of moves from S to G")
    loops: int = Field(8, description="extra openings between corridors (alternative routes)")
    corridor_bias: float = Field(0.85, description="probability to extend the newest corridor")
    max_candidates: int = Field(10_000, description="give up on one maze after this many rejected candidates")
    num_workers: int = Field(2, description="generator processes")


@cache
def _neighbours(size: int) -> list[tuple[int, ...]]:
    """4-neighbours of every cell of a size x size grid (row-major cell ids)."""
    result = []
    for c in range(size * size):
        r, k = divmod(c, size)
        result.append(
            tuple(
                rr * size + kk
                for rr, kk in ((r - 1, k), (r + 1, k), (r, k - 1), (r, k + 1))
                if 0 <= rr < size and 0 <= kk < size
            )
        )
    return result


def carve(size: int, rng: random.Random, loops: int, corridor_bias: float) -> bytearray:
    """Open cells (1) of a random tree of corridors plus `loops` extra openings."""
    nb = _neighbours(size)
    is_open = bytearray(size * size)
    open_around = bytearray(size * size)  # number of open 4-neighbours of each cell

    def open_cell(c: int) -> None:
        is_open[c] = 1
        for m in nb[c]:
            open_around[m] += 1

    first = rng.randrange(size * size)
    open_cell(first)
    active = [first]
    while active:
        i = len(active) - 1 if rng.random() < corridor_bias else rng.randrange(len(active))
        c = active[i]
        options = [n for n in nb[c] if not is_open[n] and open_around[n] == 1]
        if options:
            n = options[rng.randrange(len(options))]
            open_cell(n)
            active.append(n)
        else:
            active[i] = active[-1]
            active.pop()
    # Walls between two collinear open cells: opening one joins two corridors into a loop.
    joints = [
        c
        for c in range(size * size)
        if not is_open[c]
        and open_around[c] >= 2
        and (
            (c % size not in (0, size - 1) and is_open[c - 1] and is_open[c + 1])
            or (size <= c < size * (size - 1) and is_open[c - size] and is_open[c + size])
        )
    ]
    for c in rng.sample(joints, min(loops, len(joints))):
        is_open[c] = 1
    return is_open


def bfs_count(is_open: bytearray, size: int, source: int) -> tuple[list[int], list[int]]:
    """Distances from `source` (-1 unreachable) and number of shortest paths, capped at 2."""
    nb = _neighbours(size)
    dist = [-1] * (size * size)
    count = [0] * (size * size)
    dist[source], count[source] = 0, 1
    queue = deque([source])
    while queue:
        c = queue.popleft()
        d = dist[c] + 1
        for n in nb[c]:
            if not is_open[n]:
                continue
            if dist[n] < 0:
                dist[n] = d
                count[n] = count[c]
                queue.append(n)
            elif dist[n] == d:
                count[n] = min(2, count[n] + count[c])
    return dist, count


def make_maze(
    rng: random.Random,
    size: int = 30,
    min_path_length: int = 101,
    loops: int = 8,
    corridor_bias: float = 0.85,
    max_candidates: int = 10_000,
) -> tuple[str, str, int]:
    """One maze: (q, a, path length) with a unique shortest S->G path of >= min_path_length moves."""
    nb = _neighbours(size)
    for _ in range(max_candidates):
        is_open = carve(size, rng, loops, corridor_bias)
        cells = [c for c in range(size * size) if is_open[c]]
        # Two BFS passes find a far-out cell A; any start far enough from A has a goal in reach.
        dist, _ = bfs_count(is_open, size, cells[rng.randrange(len(cells))])
        far = max(cells, key=dist.__getitem__)
        dist, _ = bfs_count(is_open, size, far)
        starts = [c for c in cells if dist[c] >= min_path_length]
        if not starts:
            continue  # this maze is too small for the requested path length
        start = starts[rng.randrange(len(starts))]
        dist, count = bfs_count(is_open, size, start)
        goals = [c for c in cells if dist[c] >= min_path_length and count[c] == 1]
        if not goals:
            continue
        goal = goals[rng.randrange(len(goals))]
        q = [OPEN if o else WALL for o in is_open]
        a = q[:]
        c = goal
        while dist[c] > 1:  # walk back along the (unique) shortest path
            c = next(n for n in nb[c] if dist[n] == dist[c] - 1 and is_open[n])
            a[c] = PATH
        q[start] = a[start] = START
        q[goal] = a[goal] = GOAL
        return "".join(q), "".join(a), dist[goal]
    raise ValueError(
        f"--min-path-length {min_path_length}: no maze found in {max_candidates} candidates "
        f"(try a lower length or a higher --corridor-bias)"
    )


def main(config: GenerateMazeConfig) -> None:
    """Generate square mazes with a unique shortest path into train.csv and test.csv."""
    if config.size < 2:
        raise ValueError(f"--size must be >= 2, got {config.size}")
    if not 0.0 <= config.corridor_bias <= 1.0:
        raise ValueError(f"--corridor-bias must be in [0, 1], got {config.corridor_bias}")
    if config.min_path_length < 1 or config.loops < 0:
        raise ValueError(
            f"--min-path-length must be >= 1 and --loops >= 0, got {config.min_path_length}, {config.loops}"
        )
    make = partial(
        make_maze,
        size=config.size,
        min_path_length=config.min_path_length,
        loops=config.loops,
        corridor_bias=config.corridor_bias,
        max_candidates=config.max_candidates,
    )
    source = f"generate_maze:seed={config.seed}"
    generate_splits(config.output_dir, make, config.num_train, config.num_test, config.seed, config.num_workers, source)


def command_line() -> int:
    """`python dataset/generate_maze.py ...` and `hrm-generate-maze ...`: flags, one-line errors, the exit status."""
    return run_cli(main, GenerateMazeConfig, output_entries=CSV_FILES)


if __name__ == "__main__":
    sys.exit(command_line())
