"""Throughput of the offline puzzle generators (puzzles per second, wall clock).

    python benchmarks/bench_generators.py [--num 200] [--num-workers 2]

Runs each generator's CLI path (process pool, CSV writing, progress bar) on a fresh folder with
its default "hard" settings (Sudoku: unique, minimal, rating >= 1; Maze: 30x30, unique shortest
path of >= 101 moves), prints a small table and one JSON line per generator.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.generate_maze import GenerateMazeConfig  # noqa: E402
from dataset.generate_maze import main as maze_main  # noqa: E402
from dataset.generate_sudoku import GenerateSudokuConfig  # noqa: E402
from dataset.generate_sudoku import main as sudoku_main  # noqa: E402


def run(name, main, config_cls, num, workers, **extra):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_cls(output_dir=tmp, num_train=num, num_test=0, num_workers=workers, seed=0, **extra)
        start = time.perf_counter()
        main(cfg)
        seconds = time.perf_counter() - start
        rows = (Path(tmp) / "train.csv").read_text().splitlines()[1:]
        ratings = [int(r.rsplit(",", 1)[1]) for r in rows]
    return {
        "generator": name,
        "puzzles": num,
        "workers": workers,
        "seconds": round(seconds, 2),
        "puzzles_per_s": round(num / seconds, 1),
        "mean_rating": round(statistics.mean(ratings), 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    results = [
        run("sudoku (min rating 1)", sudoku_main, GenerateSudokuConfig, args.num, args.num_workers, min_rating=1),
        run("maze 30x30 (path >= 101)", maze_main, GenerateMazeConfig, args.num, args.num_workers),
    ]
    print(f"\n{'generator':<28}{'workers':>8}{'puzzles':>9}{'seconds':>9}{'puzzles/s':>11}{'mean rating':>13}")
    for r in results:
        print(
            f"{r['generator']:<28}{r['workers']:>8}{r['puzzles']:>9}{r['seconds']:>9}{r['puzzles_per_s']:>11}{r['mean_rating']:>13}"
        )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
