"""Time this library and a reference's own code on the same shapes in one command, and print the speed-ups.

    python benchmarks/compare_reference.py --shapes sudoku            # HRM's code from .ref/hrm
    python benchmarks/compare_reference.py --shapes trm_mlp --json-out results.jsonl   # TRM's code from .ref/trm
    python benchmarks/compare_reference.py --shapes sudoku --rounds 2 --variant portable=HRM_KERNELS=portable

Design choices:
- Each measurement is its own process, one after the other on the same GPU: `benchmarks/bench_hrm.py` for this
  library (its default configuration unless overrides are given), `benchmarks/bench_reference.py` for the
  reference (HRM's code for the HRM shapes, TRM's for the TRM shapes, copies of their `models/` and `config/` in
  git-ignored folders). Separate processes keep compilation caches, allocator pools and autotuning apart.
- `--rounds N` repeats the whole alternation (ours, reference, ours, reference, ...) so the spread between rounds of
  the same code shows the noise; the ratios use the median over rounds.
- `--variant NAME=KEY=VALUE[,KEY=VALUE]` times this library once more per round with those settings, to attribute
  a gain to a change in one command. An upper-case KEY is an environment variable (e.g. `HRM_KERNELS=portable`,
  the PyTorch op sequence, or `HRM_KERNELS_OFF=name` for the default without one kernel); any other is a Hydra
  override of that run (e.g. `compile_mode=reduce-overhead`). An item without `=` continues the previous value.
  With `--profile-dir` each variant is profiled too, in a folder of its name, so the kernel tables of a change and
  of the run without it come from the same command.
- Each row keeps the host's time to issue a train step (`*_host_ms`, this library's runs). Below the step time,
  the host runs ahead and the GPU sets the pace. Equal to it, something in the step waits for the GPU (a host
  read of a device value), and each step starts on an idle GPU.
- One shape per call keeps a call inside ten minutes on an H200 (compilation dominates: about a minute per
  process). Prints a table last and one JSON line per shape (`--json-out` appends them to a file).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_OF = {"sudoku": "hrm", "maze": "hrm", "arc": "hrm", "trm": "trm", "trm_mlp": "trm", "trm_arc": "trm"}


def run_json(cmd: list[str], env: dict[str, str], log) -> dict:
    """Run a benchmark process; return its last JSON line (its full output goes to `log`)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}  ({time.perf_counter() - start:.0f} s, exit {proc.returncode})\n")
    log.write(proc.stdout + proc.stderr + "\n")
    log.flush()
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(rows[-1])


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass(frozen=True)
class Variant:
    """One more timed configuration of this library: environment variables and Hydra overrides."""

    name: str
    env: dict[str, str]
    overrides: list[str]


def parse_variant(text: str) -> Variant:
    """NAME=KEY=VALUE[,KEY=VALUE]: upper-case keys are environment variables, the rest Hydra overrides. An item
    without '=' continues the previous value (`HRM_KERNELS_OFF=a,b` switches off both kernels)."""
    name, _, assignments = text.partition("=")
    pairs: list[list[str]] = []
    for item in assignments.split(","):
        if "=" in item:
            pairs.append(item.split("=", 1))
        elif pairs and item:
            pairs[-1][1] += "," + item
        else:
            pairs = []
            break
    if not name or not pairs or not all(key for key, _ in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE]")
    if name in ("ours", "reference"):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: the name {name!r} is taken by a built-in run")
    env = {key: value for key, value in pairs if ENV_NAME.fullmatch(key)}
    overrides = [f"{key}={value}" for key, value in pairs if not ENV_NAME.fullmatch(key)]
    return Variant(name, env, overrides)


def compare_shape(
    shape: str,
    rounds: int,
    variants: list[Variant],
    run_ours: Callable[[str, Variant | None, int], dict],
    run_reference: Callable[[str, int], dict],
) -> dict:
    """One shape's JSON row: this library's default run, each variant and the reference, alternated for `rounds`
    rounds, with the speed-ups. A variant that fails (an experimental kernel that does not build, say) is recorded
    as `NAME_error` and left out of the later rounds, so the rest of the comparison still comes back; a failure of
    the default run or the reference raises RuntimeError."""
    runs: dict[str, list[dict]] = {"ours": [], "reference": [], **{v.name: [] for v in variants}}
    errors: dict[str, str] = {}
    for round_index in range(rounds):
        runs["ours"].append(run_ours(shape, None, round_index))
        for variant in variants:
            if variant.name in errors:
                continue
            try:
                runs[variant.name].append(run_ours(shape, variant, round_index))
            except RuntimeError as e:
                errors[variant.name] = str(e)
                print(f"warning: {shape}: variant {variant.name} failed: {e}", file=sys.stderr, flush=True)
        runs["reference"].append(run_reference(shape, round_index))
    row = {
        "bench": "compare_reference",
        "shape": shape,
        "reference": REFERENCE_OF[shape],
        "device": runs["ours"][0]["device"],
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d"),
    }
    timed = [name for name in runs if name not in errors]
    for name in timed:
        row[f"{name}_train_ms"] = [r["train_ms_per_step"] for r in runs[name]]
        row[f"{name}_eval_ms"] = [r["eval_ms_per_batch"] for r in runs[name]]
        if all("train_host_ms_per_step" in r for r in runs[name]):
            row[f"{name}_host_ms"] = [r["train_host_ms_per_step"] for r in runs[name]]
    for name in [n for n in timed if n != "reference"]:
        row[f"{name}_train_speedup"] = round(
            median(runs["reference"], "train_ms_per_step") / median(runs[name], "train_ms_per_step"), 3
        )
        row[f"{name}_eval_speedup"] = round(
            median(runs["reference"], "eval_ms_per_batch") / median(runs[name], "eval_ms_per_batch"), 3
        )
    row.update({f"{name}_error": message for name, message in errors.items()})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", required=True, help=f"comma-separated, from {sorted(REFERENCE_OF)}")
    parser.add_argument("--hrm-ref", default=".ref/hrm", help="copy of sapientinc/HRM's models/ and config/")
    parser.add_argument("--trm-ref", default=".ref/trm", help="copy of TinyRecursiveModels' models/ and config/")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=None, help="override every shape's batch")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the alternation to see the noise")
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="NAME=KEY=VALUE,... (KEY: ENV_VAR or a Hydra override)",
    )
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="kernel profiles of this library's runs (round 1): here, variants in DIR/NAME",
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--log", default=None, help="full output of every process (default: stderr)")
    parser.add_argument("override", nargs="*", help="Hydra overrides for this library's runs")
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in REFERENCE_OF]
    if unknown:
        parser.exit(2, f"error: --shapes: unknown {unknown}; choose from {sorted(REFERENCE_OF)}\n")
    refs = {"hrm": args.hrm_ref, "trm": args.trm_ref}
    for shape in shapes:
        ref_dir = refs[REFERENCE_OF[shape]]
        if not os.path.isdir(os.path.join(ref_dir, "models")):
            parser.exit(2, f"error: {ref_dir}: no models/ folder (a copy of the reference repository is expected)\n")

    log = open(args.log, "a") if args.log else sys.stderr  # noqa: SIM115 - closed at the end
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--eval-batches", str(args.eval_batches)]
    if args.global_batch_size:
        timing += ["--global-batch-size", str(args.global_batch_size)]

    def profiled(variant: str | None, round_index: int) -> list[str]:
        """bench_hrm.py's profile flag for the first round: the default run's tables in --profile-dir, each
        variant's in a folder of its name there (so a change's kernels can be compared with the run without it)."""
        if not args.profile_dir or round_index:
            return []
        folder = args.profile_dir if variant is None else os.path.join(args.profile_dir, variant)
        os.makedirs(folder, exist_ok=True)
        return ["--profile-dir", folder]

    def run_ours(shape: str, variant: Variant | None, round_index: int) -> dict:
        ours = [sys.executable, os.path.join(HERE, "bench_hrm.py"), "--shapes", shape, *timing]
        if variant is None:
            return run_json([*ours, *profiled(None, round_index), *args.override], dict(os.environ), log)
        cmd = [*ours, *profiled(variant.name, round_index), *args.override, *variant.overrides]
        return run_json(cmd, {**os.environ, **variant.env}, log)

    def run_reference(shape: str, round_index: int) -> dict:
        reference = [sys.executable, os.path.join(HERE, "bench_reference.py"), "--ref-dir", refs[REFERENCE_OF[shape]]]
        return run_json([*reference, "--shapes", shape, *timing], dict(os.environ), log)

    rows, failed = [], []
    for shape in shapes:
        try:
            row = compare_shape(shape, args.rounds, args.variant, run_ours, run_reference)
        except RuntimeError as e:  # this library's default run or the reference's failed: nothing to compare
            print(f"error: {shape}: {e}", file=sys.stderr, flush=True)
            failed.append(shape)
            continue
        row["overrides"] = args.override
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")

    print(f"{'shape':8} {'code':10} {'train ms':>18} {'host ms':>14} {'eval ms':>20} {'train x':>8} {'eval x':>7}")
    for row in rows:
        for name in ["reference", "ours", *(v.name for v in args.variant)]:
            if f"{name}_error" in row:
                print(f"{row['shape']:8} {name:10} failed: {row[f'{name}_error']}")
                continue
            train = "/".join(f"{v:.1f}" for v in row[f"{name}_train_ms"])
            evals = "/".join(f"{v:.0f}" for v in row[f"{name}_eval_ms"])
            host = "/".join(f"{v:.1f}" for v in row.get(f"{name}_host_ms", [])) or "-"
            ratio = (
                "" if name == "reference" else f"{row[f'{name}_train_speedup']:8.3f} {row[f'{name}_eval_speedup']:7.3f}"
            )
            print(f"{row['shape']:8} {name:10} {train:>18} {host:>14} {evals:>20} {ratio}")
    if log is not sys.stderr:
        log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
