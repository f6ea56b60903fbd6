"""Small GPUs and Macs: a device without native bfloat16 runs the model in float32 (with a notice), and
`device=mps` is chosen, refused or reported as torch makes it possible.

No GPU and no MPS device exist here: the probes (`torch.cuda.is_bf16_supported`, `torch.backends.mps.*`)
are monkeypatched, and what needs the device itself is left to the GPU tests and to a Mac.
"""

import subprocess
import sys

import pytest
import torch

import pretrain
from tests.helpers import REPO, make_tiny_dataset, tiny_config
from training import build
from utils import distributed
from utils.cli import describe_error
from utils.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CUDA = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
MPS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("mps"))
HRM = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"

# torch's message for an operator the MPS backend lacks (aten/src/ATen/mps/MPSFallback.mm)
MPS_MISSING_OP = (
    "The operator 'aten::_foreach_addcdiv_.Scalar' is not currently implemented for the MPS device. If you want this "
    "op to be added in priority during the prototype phase of this feature, please comment on "
    "https://github.com/pytorch/pytorch/issues/77764. As a temporary fix, you can set the environment variable "
    "`PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op. WARNING: this will be slower than "
    "running natively on MPS."
)


def model_class():
    from utils.functions import load_model_class

    return load_model_class(HRM)


@pytest.fixture
def gpu_without_bf16(monkeypatch):
    probes = []
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: probes.append(including_emulation)
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return probes


@pytest.mark.parametrize("configured", [None, "bfloat16"])  # the model's default (hrm_v1.yaml sets none), or set
def test_gpu_without_native_bf16_runs_float32_with_a_notice(configured, gpu_without_bf16, capsys):
    model_config = {} if configured is None else {"forward_dtype": configured}
    build.fit_forward_dtype(model_class(), model_config, CUDA)
    assert model_config == {"forward_dtype": "float32"}
    assert gpu_without_bf16 == [False]  # emulated bfloat16 (slow) does not count
    assert capsys.readouterr().err == "notice: cuda:0 (Tesla T4) has no native bfloat16: the model runs in float32\n"


def test_forward_dtype_unchanged_where_bf16_is_native_or_not_asked_for(monkeypatch, capsys, gpu_without_bf16):
    explicit = {"forward_dtype": "float32"}
    build.fit_forward_dtype(model_class(), explicit, CUDA)
    assert explicit == {"forward_dtype": "float32"} and gpu_without_bf16 == []  # no probe needed
    for info in (CPU, DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))):
        model_config = {"forward_dtype": "bfloat16"}
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        build.fit_forward_dtype(model_class(), model_config, info)
        assert model_config == {"forward_dtype": "bfloat16"}
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("macos_14", [False, True])
def test_mps_forward_dtype_follows_the_macos_version(macos_14, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *v: asked.append(v) or macos_14)
    model_config = {"forward_dtype": "bfloat16"}
    build.fit_forward_dtype(model_class(), model_config, MPS)
    assert asked == [(14, 0)] and model_config["forward_dtype"] == ("bfloat16" if macos_14 else "float32")


def test_create_model_builds_the_float32_model_where_bf16_is_missing(tmp_path, monkeypatch, capsys):
    """The one place where the dtype is decided is the one the launchers build through (`create_model`)."""
    data = make_tiny_dataset(tmp_path / "data")
    config = tiny_config(data, tmp_path / "run", "arch.forward_dtype=bfloat16")
    metadata = pretrain.create_dataloader(config, "train", CPU, test_set_mode=False, epochs=1)[0].metadata
    monkeypatch.setattr(build, "bf16_supported", lambda device: False)
    head, _ = build.create_model(config, metadata, CPU)
    assert head.model.inner.forward_dtype == torch.float32 and head.model.config.forward_dtype == "float32"
    assert "has no native bfloat16" in capsys.readouterr().err
    monkeypatch.setattr(build, "bf16_supported", lambda device: True)
    assert build.create_model(config, metadata, CPU)[0].model.inner.forward_dtype == torch.bfloat16


@pytest.mark.parametrize("command", ["pretrain.py", "evaluate.py"])
def test_mps_is_refused_where_torch_has_no_mps(command, tmp_path):
    """This machine: `device=mps` through the real command line is one line, status 2, before any work."""
    assert not torch.backends.mps.is_available()
    data = make_tiny_dataset(tmp_path / "data")
    args = [f"data_path={data}", f"checkpoint_path={tmp_path / 'run'}", "arch=hrm_tiny", "use_wandb=false"]
    if command == "evaluate.py":
        args = [f"checkpoint={tmp_path / 'run' / 'step_1'}"]
    done = subprocess.run(
        [sys.executable, str(REPO / command), *args, "device=mps"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: config key 'device': device=mps: the MPS backend is not available (")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_mps_is_chosen_when_available_and_only_when_asked(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("mps") == torch.device("mps")
    assert distributed.resolve_device("auto") == torch.device("cpu")  # auto computes on a Mac as before
    with pytest.raises(ValueError, match="expected auto, cuda, mps or cpu, got 'tpu'"):
        distributed.resolve_device("tpu")


def test_mps_runs_one_process(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"device=mps runs one process \(neither gloo nor NCCL reduces MPS tensors\)"):
        distributed.setup_distributed("mps")


def test_mps_defaults_no_compile_no_pinned_memory_no_async_metrics(tmp_path):
    from training.train_step import use_async_metrics

    config = tiny_config(make_tiny_dataset(tmp_path / "data"), tmp_path / "run")
    assert build.use_compile(config, torch.device("mps")) is False
    assert use_async_metrics(config, MPS) is False
    assert build.create_dataloader(config, "test", MPS, test_set_mode=True, epochs=1)[1].pin_memory is False
    assert build.create_dataloader(config, "test", CUDA, test_set_mode=True, epochs=1)[1].pin_memory is True


def test_an_operator_missing_on_mps_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A NotImplementedError as torch raises it on MPS, met inside a train step of the real command line."""
    data = make_tiny_dataset(tmp_path / "data")

    def launch_on_mps(*args, **kwargs):
        raise NotImplementedError(MPS_MISSING_OP)

    monkeypatch.setattr(pretrain, "launch_train_step", launch_on_mps)
    overrides = [f"data_path={data}", f"checkpoint_path={tmp_path / 'run'}", "arch=hrm_tiny", "global_batch_size=4"]
    overrides += ["epochs=2", "eval_interval=2", "use_wandb=false", "device=cpu"]
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: device=mps: the operator 'aten::_foreach_addcdiv_.Scalar' is not implemented for MPS in this torch "
        "(PYTORCH_ENABLE_MPS_FALLBACK=1 in the environment runs such operators on the CPU, slower)"
    )
    assert describe_error(NotImplementedError("something else")) is None  # other errors keep their traceback
