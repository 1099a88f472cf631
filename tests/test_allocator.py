"""allocator.keep_freed_memory: training steps reuse freed large buffers without page faults; the opt-outs hold.

The setting is process-wide, so each case runs in a fresh interpreter. Page faults are counted
(getrusage's minor faults), not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from orpo_distill.allocator import _glibc, keep_freed_memory, without_malloc_settings

CHILD = r"""
import json, resource, torch
from orpo_distill.allocator import keep_freed_memory
done = keep_freed_memory()
torch.manual_seed(0); torch.set_num_threads(1)
# a training step with buffers over glibc's largest mmap threshold (32 MiB): [n, 49152] fp32 logits
m = torch.nn.Sequential(torch.nn.Embedding(49152, 64), torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 49152))
opt = torch.optim.AdamW(m.parameters())
faults = []
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ids = torch.randint(0, 49152, (300 + 37 * (step % 3),))
    torch.nn.functional.cross_entropy(m(ids), ids).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults}))
"""

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")


def _run(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env={**without_malloc_settings(os.environ), **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@glibc_only
def test_training_steps_reuse_the_last_steps_pages_instead_of_faulting_them_in_again():
    kept, system = _run(), _run(ORPO_DISTILL_MALLOC="system")
    assert kept["done"].startswith("kept in the process")
    assert system["done"] == "glibc defaults (ORPO_DISTILL_MALLOC=system)"
    # glibc's default re-faults every >32 MiB buffer each step; kept, the later steps reuse the pages
    assert sum(system["faults"][-2:]) > 2 * 10_000
    assert sum(kept["faults"][-2:]) < sum(system["faults"][-2:]) / 10


def test_explicit_malloc_settings_and_other_allocators_are_left_alone():
    assert keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"}).startswith("left to the MALLOC_*")
    assert keep_freed_memory({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}).startswith(
        "left to the allocator in LD_PRELOAD")
    assert keep_freed_memory({"ORPO_DISTILL_MALLOC": "SYSTEM"}).startswith("glibc defaults")
    # a child process that must decide for itself gets none of them
    env = {"MALLOC_MMAP_MAX_": "1", "GLIBC_TUNABLES": "x", "ORPO_DISTILL_MALLOC": "system", "PATH": "/bin",
           "LD_PRELOAD": "libtcmalloc.so"}
    assert without_malloc_settings(env) == {"PATH": "/bin"}
    assert without_malloc_settings({"LD_PRELOAD": "libfoo.so"}) == {"LD_PRELOAD": "libfoo.so"}


def test_a_model_loaded_on_the_cpu_applies_it_and_one_on_another_device_does_not(monkeypatch, tiny_model_dir):
    """A model the CPU computes with (training or sampling on the CPU) turns it on; GPU runs keep glibc's
    default (their large buffers live in the GPU's own caching allocator; host RSS stays as it was)."""
    from orpo_distill import models

    called = []
    monkeypatch.setattr(models, "keep_freed_memory", lambda: called.append(True) or "kept")
    models.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert called == [True]
    monkeypatch.setattr(models, "pick_device", lambda device: torch.device("meta"))
    models.load_model(str(tiny_model_dir), dtype="float32", device="cuda")
    assert called == [True]


RELEASE_CHILD = r"""
import json
from orpo_distill.allocator import release_free_memory
from orpo_distill.memory import rss_mib
blocks = [bytes(64 * 1024) for _ in range(6000)]  # 375 MiB in the heap (each block under the mmap threshold)
keep = bytes(64 * 1024)  # a live block above them: freeing the rest leaves no free top to trim by itself
del blocks
freed = rss_mib()
release_free_memory()
print(json.dumps({"freed": freed, "released": rss_mib()}))
"""


@glibc_only
def test_release_free_memory_hands_freed_heap_pages_back():
    """A stage's freed memory stays resident under glibc unless trimmed: release_free_memory() (called at
    the end of every sampling stage and evaluation) hands it back, with or without ORPO_DISTILL_MALLOC."""
    def run(**env):
        out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], env={**without_malloc_settings(os.environ), **env},
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for env in ({}, {"ORPO_DISTILL_MALLOC": "system"}):
        out = run(**env)
        assert out["freed"] - out["released"] > 250, env  # MiB
