"""Several machines, played by two torchrun agents on this machine (CPU, gloo, all traffic on 127.0.0.1).

Each agent stands for one node: `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint
127.0.0.1:PORT --rdzv-id JOB --local-addr 127.0.0.1`, started as its own subprocess, with GLOO_SOCKET_IFNAME=lo
(`--local-addr` makes rank 0's agent publish 127.0.0.1 as MASTER_ADDR instead of the host name). Both agents
write into one checkpoint folder because they share this machine's disk; on real nodes `checkpoint_path` must
be a folder every node sees: rank 0 writes it and `resume=auto` reads it on every rank.

- Two agents with one worker each end with the same weights, optimizer moments, step, data position, ACT
  carries, RNG states and metric lines as one agent with two workers (the reference run below).
- SIGKILL of one agent's worker (not of the agent): that agent exits 1 and reports the worker's -9; the other
  agent's worker sees the connection drop at once, exits 5 with one `error:` line, and its agent exits 1, long
  before `dist_timeout_s`. Relaunching both with `resume=auto` ends bit-identical to the uninterrupted run.
- `--max-restarts 1` on both agents: after one killed worker both agents start new workers, which resume from
  the last train state and end bit-identical. The agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with
  torch's default shared store the restarted group fails to connect (README "Several machines").

Agent 0 is started first and binds the rendezvous port before agent 1 starts, so it hosts the c10d store, as
the node named in `--rdzv-endpoint` does on a cluster. Each worker pauses (in the wrapped train step) where
the test wants to kill it, after a train state of the previous step is on disk, so the kill point and the
resume point are fixed; the kill itself is a real SIGKILL from outside.
"""

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_ARCH, free_port, make_tiny_dataset, metric_records
from training.run_folder import RUN_ID_FILE
from training.train_state import read_train_state
from utils.checkpointing import find_latest_train_state, train_state_path
from utils.distributed import restarts_share_agent_store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads sockets and processes in /proc")

TIMEOUT_S = 30  # dist_timeout_s of every run
SHARE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # set for the elastic run only (module docstring)
TOTAL_STEPS = 8  # epochs=4 x 8 groups / global batch 4; evaluations (and step_N files) after steps 4 and 8

# The real entry point; the wrapper records this worker (pid, agent, rank, addresses, first step) in
# out/worker.PID.json and, when its agent's env says so, stops before a given step once, until killed.
DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {repo!r})

    out = {out!r}
    record = {{
        "pid": os.getpid(),
        "agent": os.getppid(),
        "rank": int(os.environ["RANK"]),
        "master_addr": os.environ["MASTER_ADDR"],
        "started": time.time(),
    }}

    def write(name, text):
        with open(f"{{out}}/.{{name}}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{{out}}/.{{name}}.tmp", f"{{out}}/{{name}}")

    write(f"worker.{{os.getpid()}}.json", json.dumps(record))
    import pretrain

    pause_at = os.environ.get("TEST_PAUSE_AT_STEP")
    original = pretrain.launch_train_step

    def launch_train_step(config, state, batch, global_batch_size, info):
        if "first_step" not in record:
            record.update(first_step=state.step, first_step_time=time.time())
            write(f"worker.{{os.getpid()}}.json", json.dumps(record))
        if pause_at is not None and state.step == int(pause_at) and not os.path.exists(f"{{out}}/paused"):
            write("paused", str(os.getpid()))
            time.sleep(600)
        return original(config, state, batch, global_batch_size, info)

    pretrain.launch_train_step = launch_train_step  # the name the train loop calls
    pretrain.main()
    """
)


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_ARCH,
        f"data_path={data}",
        f"checkpoint_path={run_dir}",
        "project_name=test",
        "run_name=multinode",
        "global_batch_size=4",
        "epochs=4",
        "eval_interval=2",
        "lr=1e-3",
        "lr_warmup_steps=2",
        "use_wandb=false",
        "device=cpu",
        "evaluators=[]",
        "checkpoint_interval_steps=1",
        f"dist_timeout_s={TIMEOUT_S}",
        *extra,
    ]


class Launch:
    """torchrun agents of one job, as subprocesses with their output in files; `out` collects worker records."""

    def __init__(self, tmp: Path, name: str, data: Path, run_dir: Path, *, nnodes: int = 2, agent_args=(), extra=()):
        self.tmp, self.nnodes = tmp, nnodes
        self.out = tmp / f"{name}.out"
        self.out.mkdir()
        self.driver = tmp / f"{name}.driver.py"
        self.driver.write_text(DRIVER.format(repo=str(REPO), out=str(self.out)))
        self.name, self.port, self.job = name, free_port(), uuid.uuid4().hex[:8]
        self.args = [*agent_args, str(self.driver), *overrides(data, run_dir, *extra)]
        self.agents: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, nproc: int = 1, env_of=lambda node: {}, cwd_of=None) -> "Launch":
        base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", SHARE_OFF)}
        base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo")
        for node in range(self.nnodes):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nnodes)]
            cmd += ["--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-id", self.job]
            cmd += ["--rdzv-endpoint", f"127.0.0.1:{self.port}", "--local-addr", "127.0.0.1", *self.args]
            log = self.tmp / f"{self.name}.agent{node}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.agents.append(
                    subprocess.Popen(
                        cmd, cwd=cwd_of(node) if cwd_of else self.tmp, env={**base, **env_of(node)}, stdout=f, stderr=f
                    )
                )
            if node == 0:
                self.wait_for_store()
        return self

    def wait_for_store(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.agents[0].poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"agent 0 did not open 127.0.0.1:{self.port}:\n{self.log(0)[-3000:]}")

    def log(self, node: int) -> str:
        return self.logs[node].read_text()

    def workers(self) -> list[dict]:
        return sorted((json.loads(p.read_text()) for p in self.out.glob("worker.*.json")), key=lambda w: w["started"])

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [agent.returncode for agent in self.agents]

    def stop(self) -> None:
        """Whatever is still running after a failed assertion: agents (they stop their workers), then workers."""
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(timeout=40)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for worker in self.workers():
            if alive(worker["pid"]):
                os.kill(worker["pid"], signal.SIGKILL)


def wait_for(path: Path, launch: Launch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        codes = [a.poll() for a in launch.agents]
        assert time.monotonic() < deadline and None in codes, (path, codes, launch.log(0)[-3000:])
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp{,6} prints each 32-bit word of the address in host order (little-endian here)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def tcp_connections(pid: int) -> list[tuple[str, str]]:
    """(local, remote) addresses of every established TCP connection the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    connections = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                    local, remote = (_address(a.split(":")[0]) for a in fields[1:3])
                    connections.append((str(local), str(remote)))
                    assert _loopback(local) and _loopback(remote), (pid, local, remote)
    return connections


# ------------------------------------------------------------------------------------------ results


def assert_same(got, want, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final train state (all but the config, which names the folder, and the run id, which is the run's own),
    weights file and metric lines."""
    got, want = (read_train_state(find_latest_train_state(str(d))) for d in (run_dir, reference))
    assert got["step"] == want["step"] == TOTAL_STEPS
    assert got["run_id"] == (run_dir / RUN_ID_FILE).read_text().strip()  # a resumed run keeps its id
    identity = ("config", "run_id")
    assert_same(*({k: v for k, v in state.items() if k not in identity} for state in (got, want)), "")
    weights = [torch.load(d / f"step_{TOTAL_STEPS}", weights_only=True) for d in (run_dir, reference)]
    assert_same(weights[0], weights[1], f"step_{TOTAL_STEPS}")
    lines = [metric_records(d / "metrics.jsonl") for d in (run_dir, reference)]
    assert len(lines[1]) > TOTAL_STEPS and lines[0] == lines[1]


def resumed_line(run_dir: Path, step: int) -> str:
    return f"resumed from {train_state_path(str(run_dir), step)} at step {step}"


LOADER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from tests.helpers import tiny_config
    from training.build import create_dataloader
    from utils.distributed import setup_distributed

    config = tiny_config({data!r}, {ckpt!r})
    _, loader = create_dataloader(config, "train", setup_distributed("cpu"), test_set_mode=False, epochs=1)
    next(iter(loader))  # starts the (persistent) loader worker
    print(os.getpid(), flush=True)
    time.sleep(600)
    """
)


def test_loader_worker_dies_with_its_process(tmp_path):
    """A killed training process takes its loader worker along at once; without that, the worker keeps the
    process group's sockets open until its watchdog looks (every 5 s), and the other ranks wait for it."""
    data = make_tiny_dataset(tmp_path / "data")
    script = tmp_path / "loader.py"
    script.write_text(LOADER.format(repo=str(REPO), data=str(data), ckpt=str(tmp_path / "ckpt")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    loader_workers = []
    try:
        pid = int(proc.stdout.readline())
        loader_workers = children(pid)
        assert len(loader_workers) == 1
        killed_at = time.monotonic()
        proc.kill()
        while alive(loader_workers[0]) and time.monotonic() - killed_at < 1:
            time.sleep(0.01)
        assert not alive(loader_workers[0])
    finally:
        proc.kill()
        proc.wait()
        for pid in loader_workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_restarts_with_the_shared_store_are_warned_about(monkeypatch):
    # The variables torchrun sets for its workers: the shared store is on unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert restarts_share_agent_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not restarts_share_agent_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert not restarts_share_agent_store()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One agent, two workers: the uninterrupted run every other run must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("multinode")
    data = make_tiny_dataset(tmp / "data", num_groups=8)
    launch = Launch(tmp, "reference", data, tmp / "reference", nnodes=1).start(nproc=2)
    try:
        assert launch.wait() == [0], launch.log(0)[-3000:]
    finally:
        launch.stop()
    return data, tmp / "reference"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_agents_train_like_one_agent_with_two_workers(reference, tmp_path):
    data, ref_dir = reference
    launch = Launch(tmp_path, "two", data, tmp_path / "run").start()
    try:
        assert launch.wait() == [0, 0], launch.log(0)[-3000:] + launch.log(1)[-3000:]
    finally:
        launch.stop()
    workers = launch.workers()
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["agent"] for w in workers} == {a.pid for a in launch.agents}  # one worker per agent
    assert {w["master_addr"] for w in workers} == {"127.0.0.1"}
    assert_same_run(tmp_path / "run", ref_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_worker_ends_the_other_agent_and_both_resume_bit_exactly(reference, tmp_path):
    data, ref_dir = reference
    run_dir, pause_at = tmp_path / "run", 3  # killed before step 4 (and its evaluation) runs
    launch = Launch(tmp_path, "killed", data, run_dir, extra=["resume=auto"])
    # Agent 1 (not the store's host) stands for the node that dies: its worker stops before step 4.
    launch.start(env_of=lambda node: {"TEST_PAUSE_AT_STEP": str(pause_at)} if node == 1 else {})
    try:
        wait_for(launch.out / "paused", launch)
        wait_for(Path(train_state_path(str(run_dir), pause_at)), launch)
        victim = int((launch.out / "paused").read_text())
        workers = {w["pid"]: w for w in launch.workers()}
        survivor = next(w for pid, w in workers.items() if pid != victim)
        assert workers[victim]["agent"] == launch.agents[1].pid and survivor["agent"] == launch.agents[0].pid
        # Every TCP connection of the job (agents, workers, loader workers) runs over loopback.
        pids = [a.pid for a in launch.agents] + list(workers) + [c for pid in workers for c in children(pid)]
        assert sum(len(tcp_connections(pid)) for pid in pids) >= 4
        loader_workers = children(victim)
        assert loader_workers  # the train loader's worker

        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Its loader worker dies with it (else its copies of the group's sockets would stay open for seconds).
        while [pid for pid in loader_workers if alive(pid)] and time.monotonic() - killed_at < 2:
            time.sleep(0.01)
        assert not [pid for pid in loader_workers if alive(pid)]
        exited = {}
        while len(exited) < 2 and time.monotonic() - killed_at < TIMEOUT_S + 30:
            for node, agent in enumerate(launch.agents):
                if node not in exited and agent.poll() is not None:
                    exited[node] = time.monotonic() - killed_at
            time.sleep(0.01)
        assert len(exited) == 2, exited
        print(f"after the kill: agent 1 exited in {exited[1]:.2f} s, the other agent in {exited[0]:.2f} s")
        assert exited[0] < TIMEOUT_S  # the survivor did not wait for the timeout
        assert [a.returncode for a in launch.agents] == [1, 1]
        killed_log, survivor_log = launch.log(1), launch.log(0)
        assert re.search(rf"exitcode\s*:\s*-9 \(pid: {victim}\)", killed_log), killed_log[-3000:]
        assert re.search(rf"exitcode\s*:\s*5 \(pid: {survivor['pid']}\)", survivor_log), survivor_log[-3000:]
        errors = [line for line in survivor_log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, survivor_log[-3000:]
        assert errors[0].startswith(f"error: rank {survivor['rank']} of 2: a collective failed (")
        assert "Timed out" not in errors[0]  # the connection drop, not the timeout
    finally:
        launch.stop()

    relaunch = Launch(tmp_path, "relaunch", data, run_dir, extra=["resume=auto"]).start()
    try:
        assert relaunch.wait() == [0, 0], relaunch.log(0)[-3000:] + relaunch.log(1)[-3000:]
    finally:
        relaunch.stop()
    assert {w["first_step"] for w in relaunch.workers()} == {pause_at}
    assert resumed_line(run_dir, pause_at) in relaunch.log(0) + relaunch.log(1)
    assert_same_run(run_dir, ref_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_bit_exactly(reference, tmp_path):
    data, ref_dir = reference
    run_dir, pause_at = tmp_path / "run", 6  # mid-iteration, after the evaluation at step 4
    launch = Launch(tmp_path, "elastic", data, run_dir, agent_args=["--max-restarts", "1"], extra=["resume=auto"])
    # Agent 0 hosts the store and, as the older agent, normally rank 0 (the writer): its worker is killed.
    env = {SHARE_OFF: "1"}
    launch.start(env_of=lambda node: {**env, "TEST_PAUSE_AT_STEP": str(pause_at)} if node == 0 else env)
    try:
        wait_for(launch.out / "paused", launch)
        wait_for(Path(train_state_path(str(run_dir), pause_at)), launch)
        victim = int((launch.out / "paused").read_text())
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        assert launch.wait() == [0, 0], launch.log(0)[-3000:] + launch.log(1)[-3000:]
        ended = time.time() - killed_at
    finally:
        launch.stop()

    workers = launch.workers()
    first, restarted = workers[:2], workers[2:]
    assert victim in {w["pid"] for w in first} and len(restarted) == 2, workers
    # The new group: one worker per agent again, both started after the kill and resumed at the saved step.
    assert sorted(w["rank"] for w in restarted) == [0, 1]
    assert {w["agent"] for w in restarted} == {a.pid for a in launch.agents}
    assert all(w["started"] > killed_at and w["first_step"] == pause_at for w in restarted)
    assert resumed_line(run_dir, pause_at) in launch.log(0) + launch.log(1)
    started = max(w["started"] for w in restarted) - killed_at
    stepped = max(w["first_step_time"] for w in restarted) - killed_at
    print(f"after the kill: new workers started in {started:.2f} s, resumed at step {pause_at} in {stepped:.2f} s,")
    print(f"run finished in {ended:.2f} s")
    assert "warning: torchrun --max-restarts" not in launch.log(0) + launch.log(1)
    assert_same_run(run_dir, ref_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("resume", ["auto", "path"])
def test_a_checkpoint_folder_that_not_every_node_sees_is_refused(reference, tmp_path, resume):
    """A relative checkpoint_path from two working folders plays node-local disks: node 0's holds a train state,
    node 1's none. Without the check one rank would resume and the other start fresh, training different
    weights (measured: status 5 after dist_timeout_s, or a hang in torchrun's exit barrier)."""
    data, ref_dir = reference
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    (nodes[0] / "ckpt").mkdir()
    state = Path(find_latest_train_state(str(ref_dir)))
    (nodes[0] / "ckpt" / state.name).write_bytes(state.read_bytes())
    found = f"ckpt/{state.name}"
    launch = Launch(tmp_path, "local", data, Path("ckpt"), extra=[f"resume={'auto' if resume == 'auto' else found}"])
    launch.start(cwd_of=lambda node: nodes[node])
    try:
        assert launch.wait() == [1, 1], launch.log(0)[-3000:] + launch.log(1)[-3000:]
    finally:
        launch.stop()
    rank_of_node = {w["agent"]: w["rank"] for w in launch.workers()}
    rank_without = rank_of_node[launch.agents[1].pid]  # the rank whose folder lacks the state
    if resume == "auto":
        finds = {rank_without: "no train state", 1 - rank_without: found}
        want = (
            f"error: config key 'resume': rank 0 finds {finds[0]}, rank 1 finds {finds[1]} in "
            "checkpoint_path=ckpt: it must be a folder every node sees"
        )
    else:
        want = f"error: config key 'resume': train state not found: {found} (on rank {rank_without} of 2)"
    for node in (0, 1):
        log = launch.log(node)
        assert [line for line in log.splitlines() if line.startswith("error:")] == [want], log[-3000:]
        assert re.search(r"exitcode\s*:\s*2 ", log), log[-3000:]
        assert not re.search(r'File ".*(pretrain\.py|/utils/)', log), log[-3000:]  # no traceback from the worker
    assert not (nodes[1] / "ckpt").exists()  # nothing was trained or written
