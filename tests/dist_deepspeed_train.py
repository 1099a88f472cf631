"""Runs the CLI under ``accelerate launch`` on gloo CPU processes with Accelerate's DeepSpeed plugin.

Accelerate gives DeepSpeed only to GPU-type process groups (a CPU run is ``MULTI_CPU`` whatever
``--use_deepspeed`` says), while DeepSpeed itself runs on CPUs (its CPU accelerator, gloo for the
collectives). So this script sets up the shared Accelerator state as ``accelerate launch --use_deepspeed
--zero_stage N`` would on GPUs (the plugin from a DeepSpeed config, fp32, gradient clipping at the
trainer's 1.0; the distributed type DEEPSPEED), and then runs the command: the trainer's own
``Accelerator(cpu=True)`` finds that state and prepares the student with ``deepspeed.initialize``,
the code path of a GPU run but for the device.

Usage: python dist_deepspeed_train.py STAGE CLI-ARGS...   (e.g. 3 train CONFIG --no-progress)
"""

from __future__ import annotations

import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from orpo_distill import cli


def force_deepspeed(stage: int) -> None:
    acc = Accelerator(cpu=True)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    acc.state.deepspeed_plugins = {"default": plugin}
    acc.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    assert Accelerator(cpu=True).distributed_type == DistributedType.DEEPSPEED


if __name__ == "__main__":
    force_deepspeed(int(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
