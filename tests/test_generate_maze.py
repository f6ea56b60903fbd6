"""Maze generator: every maze checked by an independent BFS written here."""

import csv
from collections import deque

import pytest

from dataset.generate_maze import GenerateMazeConfig, main, make_maze
from dataset.generation import puzzle_rng


def steps(cell, side):
    r, c = divmod(cell, side)
    return [
        rr * side + cc
        for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1))
        if 0 <= rr < side and 0 <= cc < side
    ]


def bfs(grid, side, source):
    """(distance, number of shortest paths) per cell, by a plain BFS over non-wall cells."""
    dist, ways = {source: 0}, {source: 1}
    queue = deque([source])
    order = []
    while queue:
        cell = queue.popleft()
        order.append(cell)
        for n in steps(cell, side):
            if grid[n] != "#" and n not in dist:
                dist[n] = dist[cell] + 1
                queue.append(n)
    for cell in order[1:]:  # in BFS order every predecessor is final before its successors
        ways[cell] = sum(ways[p] for p in steps(cell, side) if dist.get(p) == dist[cell] - 1)
    return dist, ways


def check_maze(q, a, length, side, min_length):
    assert len(q) == len(a) == side * side
    assert set(q) <= set("# SG") and set(a) <= set("# SGo")
    assert q.count("S") == q.count("G") == 1
    assert all(x == y or (x == " " and y == "o") for x, y in zip(q, a))  # label = input + path marks
    s, g = q.index("S"), q.index("G")
    dist, ways = bfs(q, side, s)
    assert dist[g] == length >= min_length
    assert ways[g] == 1  # unique shortest path
    # the marked cells are exactly that path: distances 1..L-1, each adjacent to the previous
    path = [i for i, ch in enumerate(a) if ch == "o"]
    assert len(path) == length - 1
    assert sorted(dist[i] for i in path) == list(range(1, length))
    dist_g, _ = bfs(q, side, g)
    assert all(dist[i] + dist_g[i] == length for i in path)


@pytest.mark.parametrize("index", range(4))
def test_generated_maze_has_unique_long_shortest_path(index):
    q, a, length = make_maze(puzzle_rng(3, "test", index), size=30, min_path_length=101)
    check_maze(q, a, length, 30, 101)
    assert length > 100


def test_small_maze_and_min_length():
    q, a, length = make_maze(puzzle_rng(0, "train", 0), size=9, min_path_length=12, loops=3)
    check_maze(q, a, length, 9, 12)


def test_cli_reproducible_for_any_worker_count(tmp_path):
    common = dict(num_train=5, num_test=3, seed=5, size=20, min_path_length=40)
    main(GenerateMazeConfig(output_dir=str(tmp_path / "w1"), num_workers=1, **common))
    main(GenerateMazeConfig(output_dir=str(tmp_path / "w2"), num_workers=2, **common))
    for split in ("train", "test"):
        text = (tmp_path / "w1" / f"{split}.csv").read_text()
        assert text == (tmp_path / "w2" / f"{split}.csv").read_text()
        rows = list(csv.reader(text.splitlines()))
        assert rows[0] == ["source", "question", "answer", "rating"] and len(rows) == 1 + common[f"num_{split}"]
        for _, q, a, rating in rows[1:]:
            check_maze(q, a, int(rating), 20, 40)


def test_impossible_length_is_an_error():
    with pytest.raises(ValueError, match="--min-path-length 500: no maze found"):
        make_maze(puzzle_rng(0, "train", 0), size=8, min_path_length=500, max_candidates=3)
