"""Keep freed memory inside the process instead of handing it back to the kernel (glibc's malloc).

A training step allocates and frees the same large buffers every step: the autocast copies of the
weights, the gradients, the head's logit chunks, attention's workspaces. glibc serves every request
over 32 MiB with a fresh ``mmap`` and returns it with ``munmap`` when it is freed, so each step
page-faults all of that memory in again and the kernel zeroes it page by page (on a virtual machine
whose host backs guest memory lazily, far worse: docs/benchmarks.md, "Where freed memory goes").
``keep_freed_memory`` asks glibc (``mallopt``) to serve large requests from its heap and to keep up to
2 GiB of freed memory at the heap's top, so from the second step on a step reuses the pages of the one
before. ``models.load_model`` calls it for a model placed on the CPU (training or sampling there); a
process that computes on a GPU keeps glibc's defaults. The numerics are untouched (``bench/allocator.py`` measures both settings side by side).

The cost: the process's RSS stays at its peak rather than falling between phases. Set
``ORPO_DISTILL_MALLOC=system`` to keep glibc's defaults; explicit ``MALLOC_MMAP_MAX_`` /
``MALLOC_TRIM_THRESHOLD_`` settings, another allocator (jemalloc, tcmalloc) in ``LD_PRELOAD`` and a
C library other than glibc are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free memory at the heap's top
OPT_OUT = "ORPO_DISTILL_MALLOC"
GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def without_malloc_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without what :func:`keep_freed_memory` defers to (``MALLOC_*``, ``GLIBC_TUNABLES``, another
    allocator in ``LD_PRELOAD``, the opt-out): for a child process that must decide for itself."""
    return {k: v for k, v in env.items()
            if not (k in GLIBC_SETTINGS or k.startswith("MALLOC_") or k == OPT_OUT
                    or (k == "LD_PRELOAD" and any(name in v for name in OTHER_ALLOCATORS)))}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(env: Mapping[str, str] = os.environ) -> str:
    """Apply the setting where it applies; returns what was done, in words (for logs and tests)."""
    if env.get(OPT_OUT, "").lower() == "system":
        return f"glibc defaults ({OPT_OUT}=system)"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in OTHER_ALLOCATORS):
        return f"left to the allocator in LD_PRELOAD ({preload})"
    if any(name in env for name in GLIBC_SETTINGS):
        return "left to the MALLOC_* / GLIBC_TUNABLES settings in the environment"
    libc = _glibc()
    if libc is None:
        return "not glibc: left alone"
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "kept in the process (glibc: no mmap for large blocks, 2 GiB trim threshold)" if ok else \
        "glibc refused mallopt: left alone"


def release_free_memory() -> None:
    """At the end of a stage (sampling, an evaluation, a refresh): collect the objects only a reference
    cycle keeps alive (a transformers model used for sampling or evaluation is one, with its caches), then
    hand the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``; nothing elsewhere). So the
    next stage starts from live memory: measured on the demo, the sampler's and the evaluator's leftovers
    otherwise stay resident under the whole training run (RSS before training: 0.68 GiB instead of 2 GiB).
    Also when freed memory is kept in the process (the default): a stage boundary is rare, so re-faulting
    the pages once there costs little."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
