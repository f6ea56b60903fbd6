"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step, save a train state, exit 130 / 143.

Design choices:
- A signal only records a request (`requested()`); the train loop acts on it at a step boundary, so a
  step or a checkpoint write is never cut in half. A second SIGINT or SIGTERM exits at once (status
  128 + signal number, nothing saved; the last train state on disk stays valid, its writes being atomic).
- Every rank must stop at the same step, or the ranks still training would wait in a collective for the
  stopped ones. Each rank's request rides in the marker element that the gradient all-reduce already
  carries (utils/distributed.py): 0 normally, 1 when a stop is requested, NaN for a non-finite value.
  The summed marker, read with the step's metrics, tells every rank the same thing at the same step; no
  collective is added to a step. Where no step runs (between iterations, around an evaluation),
  `agreed_on_every_rank` asks with one small all-reduce.
- A stop requested during an evaluation takes effect when it ends: the loop saved a train state before
  the evaluation (with the evaluation marked pending), so a second Ctrl-C loses no training either.
- DataLoader worker processes ignore both signals (`ignore_in_loader_worker`): the training process
  decides when to stop and still needs their batches until then (a signal to the whole process group, as
  Ctrl-C in a terminal or a scheduler sends, reaches them too), and they never print a KeyboardInterrupt
  traceback. Once the training process exits, a SIGTERM ends them (multiprocessing's exit handler sends
  one to each), and they die with it in any case (utils/distributed.py `exit_with_parent`).
- The handlers are installed for the run only and the previous ones restored after, so a run started
  from Python (a notebook, the tests) leaves the interpreter's Ctrl-C as it was. Outside the main thread
  Python cannot install handlers: the run then keeps the default behaviour.
"""

import atexit
import multiprocessing
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: list[int] = []  # the signal numbers received during the run, in order


class RunInterrupted(Exception):
    """The run stopped on SIGINT / SIGTERM after saving its train state; exit status 128 + signal number."""

    line_prefix = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def requested() -> int:
    """The first signal received during the run (0: none)."""
    return _requested[0] if _requested else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _say(line: str) -> None:
    """Write from a signal handler: straight to file descriptor 2, since `print` could re-enter a write to
    sys.stderr that the interrupted code was in the middle of (Python raises for that)."""
    try:
        os.write(2, f"\n{line}\n".encode())
    except OSError:
        pass


def _handle(signum: int, _frame) -> None:
    main = os.environ.get("RANK", "0") == "0"  # one notice per run, not one per rank
    if _requested:  # the second one: leave now
        if main:
            _say(f"interrupted: second {signal_name(signum)}: exiting without saving (the last train state remains)")
        os._exit(128 + signum)
    _requested.append(signum)
    if main:
        _say(f"{signal_name(signum)}: stopping after this step and saving a train state (again to exit at once)")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM request a stop instead of ending the process."""
    _requested.clear()
    try:
        previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()


_exiting: Any = None  # set when this (training) process exits: its loader workers may then end on SIGTERM


def loader_exit_event() -> Any:
    """An event the loader workers inherit, set when this process exits (`atexit`, which runs before
    multiprocessing's own exit handler terminates and joins them)."""
    global _exiting
    if _exiting is None:
        _exiting = multiprocessing.Event()
        atexit.register(_exiting.set)
    return _exiting


def ignore_in_loader_worker(exiting: Any = None) -> None:
    """In a DataLoader worker: leave both signals to the training process (module docstring). SIGTERM still ends
    the worker once its training process is exiting (`exiting` set): that is how multiprocessing stops the
    workers of a loader not shut down before the interpreter's exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(_signum: int, _frame) -> None:
        if exiting is not None and exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def agreed_on_every_rank(device, world_size: int) -> bool:
    """Collective (one small all-reduce when distributed): whether any rank has a stop request."""
    if world_size == 1:
        return bool(requested())
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if requested() else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)
