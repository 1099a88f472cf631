"""The Accelerate configs in ``configs/accelerate/`` load with Accelerate's own code and mean what they say.

Each file goes through what ``accelerate launch --config_file FILE ...`` does before it starts any
process: Accelerate's loader (``load_config_from_file``, i.e. ``ClusterConfig.from_yaml_file``, which
refuses an unknown top-level key), the launch command's validation (which copies the file's settings
onto the launch arguments), and the environment the launcher hands to every process. The FSDP and
DeepSpeed plugins are then built from that environment, as the Accelerator in each process builds
them. So a misspelt key, a value Accelerate does not know, or a DeepSpeed JSON file it would refuse
fails here, on a CPU, without DeepSpeed installed. ``_validate_launch_command`` is private to
Accelerate: if a new Accelerate renames it, this test needs updating, not the configs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils import launch as launch_utils
from accelerate.utils.dataclasses import DeepSpeedPlugin, FullyShardedDataParallelPlugin

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"

# file -> (distributed type, processes in all, machines, mixed_precision in the file)
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, None),  # bf16 is in the DeepSpeed JSON
    "deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 8, 1, None),
    "multi-node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
}


def test_every_file_is_checked() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def launched(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, Any, dict[str, str], set[str]]:
    """(launch args, loaded config, the processes' environment, every launch option name) for
    ``accelerate launch --config_file configs/accelerate/NAME -m orpo_distill.cli run CONFIG``."""
    monkeypatch.chdir(ROOT)  # the DeepSpeed files name their JSON relative to the repository root
    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)  # main_process_port may be busy here
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", f"configs/accelerate/{name}", "-m", "orpo_distill.cli", "run", "c.yaml"])
    options = set(vars(args))
    args, config, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before deepspeed_launcher
        fields = list(config.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
    else:
        env = launch_utils.prepare_multi_gpu_env(args)
    return args, config, env, options


def use_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the launcher's Accelerate settings into this process's environment, as in a launched rank."""
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerate_and_launches_the_stated_processes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kind, processes, machines, precision = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))  # what `accelerate launch --config_file` calls
    assert config.distributed_type == kind
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, precision)
    assert config.use_cpu is False and config.machine_rank == 0

    args, _, env, options = launched(name, monkeypatch)
    # keys under fsdp_config / deepspeed_config are copied onto the launch arguments by name, and an
    # unknown one is dropped without a word: each must be a real launch option
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(getattr(config, section) or {}) - options
        assert not unknown, f"{name}: {section} keys Accelerate does not know: {sorted(unknown)}"
    assert int(args.nproc_per_node) == processes // machines
    assert env["ACCELERATE_MIXED_PRECISION"] == (precision or "no")
    assert args.use_fsdp == (kind == DistributedType.FSDP)
    assert args.use_deepspeed == (kind == DistributedType.DEEPSPEED)
    assert args.multi_gpu == (kind == DistributedType.MULTI_GPU)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_comment_gives_the_exact_command(name: str) -> None:
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert text.startswith("# "), f"{name} must open with a comment saying what it is for"
    header = text.split("\ncompute_environment:")[0]
    assert f"accelerate launch --config_file configs/accelerate/{name} -m orpo_distill.cli " in header


def test_fsdp_is_fsdp2_full_shard_with_transformer_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, env, _ = launched("fsdp.yaml", monkeypatch)
    use_env(env, monkeypatch)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment, as the Accelerator does
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # every rank samples with its own full copy of the student: no rank-0-only loading
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False


@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_plugin_builds_from_the_json(name: str, stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _, config, env, _ = launched(name, monkeypatch)
    assert Path(config.deepspeed_config["deepspeed_config_file"]).is_file()
    use_env(env, monkeypatch)
    plugin = DeepSpeedPlugin()  # refuses, among others, mixed_precision set beside a DeepSpeed config file
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # what AcceleratorState does next
    assert plugin.zero_stage == stage
    assert plugin.get_value("bf16.enabled") is True and plugin.get_value("fp16.enabled") is False
    # we prepare no DataLoader, so Accelerate needs an integer here, not "auto"
    assert isinstance(plugin.get_value("train_micro_batch_size_per_gpu"), int)
    # must equal train.grad_accum; 1 until the loop lowers Accelerate's sync_gradients between micro-batches
    assert plugin.get_value("gradient_accumulation_steps") == 1
    assert plugin.get_value("gradient_clipping") == 1.0  # = train.max_grad_norm's default
    assert plugin.zero3_init_flag is False  # every rank loads the whole student (it samples with it)
    # ZeRO-3: the full 16-bit weights are gathered for checkpoints and the exported model
    assert bool(plugin.zero3_save_16bit_model) == (stage == 3)


def test_multi_node_points_the_other_machine_at_the_main_one(monkeypatch: pytest.MonkeyPatch) -> None:
    args, config, _, _ = launched("multi-node.yaml", monkeypatch)
    assert (int(args.nnodes), int(args.node_rank)) == (2, 0)
    assert args.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"
    assert config.rdzv_backend == "static"
