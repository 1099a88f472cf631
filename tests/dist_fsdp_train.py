"""Runs the CLI under ``accelerate launch`` on gloo CPU processes with Accelerate's FSDP2 plugin.

Accelerate gives FSDP only to GPU-type process groups (a CPU run is ``MULTI_CPU``, whatever the launch
flags say), while FSDP2 itself (``fully_shard`` on DTensors) runs on gloo. So this script sets up the
shared Accelerator state as ``accelerate launch --use_fsdp --fsdp_version 2`` would on GPUs (the plugin:
FSDP2, each decoder layer wrapped, full state dicts; the distributed type FSDP), and then runs the
command: the trainer's own ``Accelerator(cpu=True)`` finds that state and prepares the student with
``fully_shard``, exactly the code path of a GPU run but for the device.

Usage: python dist_fsdp_train.py CLI-ARGS...   (e.g. train CONFIG --no-progress)
"""

from __future__ import annotations

import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from orpo_distill import cli


def force_fsdp2() -> None:
    acc = Accelerator(cpu=True)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True, cpu_ram_efficient_loading=False)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert Accelerator(cpu=True).is_fsdp2


if __name__ == "__main__":
    force_fsdp2()
    sys.exit(cli.main(sys.argv[1:]))
