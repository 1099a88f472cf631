"""Launched by test_distributed.py under ``accelerate launch`` with two processes: one mixed-policy refresh
(epoch 2) from the initial student, then each rank writes what it holds to ``OUT/rank_R.json``: the
negative buffer, the questions it has, and which questions its own generator was asked for. With
``fsdp2`` the student is sharded first with FSDP2's ``fully_shard`` (each decoder layer, then the whole
model, as Accelerate's FSDP2 plugin wraps it on GPUs), so the refresh must sample from gathered weights.

Usage: python dist_refresh.py CONFIG OUT [fsdp2]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orpo_distill import distributed
from orpo_distill.config import load_config
from orpo_distill.generators import hf
from orpo_distill.models import load_model
from orpo_distill.pipeline import Run
from orpo_distill.whole_weights import is_fsdp2


def main(config: str, out: str, sharding: str = "") -> None:
    run = Run(load_config(config), progress=False)
    asked: list[str] = []
    sampled_from_shards: list[bool] = []
    real_generate = hf.HFGenerator.generate

    def recording_generate(self, requests):  # this rank's generator: record what it is asked for
        asked.extend(r.key for r in requests)
        sampled_from_shards.append(is_fsdp2(self.model))
        return real_generate(self, requests)

    hf.HFGenerator.generate = recording_generate
    distiller = run.distiller()
    distiller.buffer = distiller.initial_buffer()
    model = load_model(run.cfg.student.model, dtype="float32", device="cpu")
    if sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert is_fsdp2(model)
    distiller.refresh(2, model)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank_{distributed.rank()}.json").write_text(json.dumps({
        "buffer": distiller.buffer.to_dict(),
        "questions": sorted(distiller.buffer.negatives),
        "asked": asked,
        "sampled_from_shards": sampled_from_shards,
    }))
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
