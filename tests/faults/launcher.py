"""Test-only launcher: ``python tests/faults/launcher.py ARGS`` is ``orpo-distill ARGS`` (it calls
``orpo_distill.cli.main`` in this process, a real one that the tests kill for real), with the fault that
the ``FAULT_*`` environment variables name patched in first. The product has no fault hooks; they exist
only here.

``FAULT_SLOW_CHECKPOINT=S``  each torch file of a checkpoint (optimizer, scheduler, RNG) takes S seconds
                             longer to write, as on a slow disk: the window in which a test watching the
                             temp folder SIGKILLs the process in the middle of the write
``FAULT_SLOW_GENERATION=S`` each batch of the hf generator takes S seconds longer, so that a kill lands
                             in the middle of a stage however fast the machine is
``FAULT_NAN_FROM_EPOCH=E``   from epoch E on, every ORPO loss is NaN (the odds-ratio term gets a NaN added)
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any


def slow_checkpoint_writes(seconds: float) -> None:
    from orpo_distill import checkpoints

    real = checkpoints._torch_save

    def slow(obj: Any, path: Path) -> None:
        time.sleep(seconds)
        real(obj, path)

    checkpoints._torch_save = slow


def slow_generation(seconds: float) -> None:
    from orpo_distill.generators import hf

    real = hf.HFGenerator._generate_batch

    def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(self, *args, **kwargs)

    hf.HFGenerator._generate_batch = slow


def nan_loss_from_epoch(first: int) -> None:
    from orpo_distill import recipe, training

    state = {"epoch": 0}
    real_epoch, real_loss = recipe.train_epoch, training.orpo_loss_of

    def train_epoch(*args: Any, **kwargs: Any) -> Any:
        state["epoch"] = inspect.signature(real_epoch).bind(*args, **kwargs).arguments["epoch"]
        return real_epoch(*args, **kwargs)

    def orpo_loss(*args: Any, **kwargs: Any) -> Any:
        out = real_loss(*args, **kwargs)
        if state["epoch"] >= first:
            out.or_loss = out.or_loss + float("nan")
        return out

    recipe.train_epoch, training.orpo_loss_of = train_epoch, orpo_loss


def main() -> int:
    if os.environ.get("FAULT_SLOW_CHECKPOINT"):
        slow_checkpoint_writes(float(os.environ["FAULT_SLOW_CHECKPOINT"]))
    if os.environ.get("FAULT_SLOW_GENERATION"):
        slow_generation(float(os.environ["FAULT_SLOW_GENERATION"]))
    if os.environ.get("FAULT_NAN_FROM_EPOCH"):
        nan_loss_from_epoch(int(os.environ["FAULT_NAN_FROM_EPOCH"]))
    from orpo_distill.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
