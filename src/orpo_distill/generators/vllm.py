"""In-process vLLM generation: the whole request list goes to the engine in one call.

Why one call: vLLM schedules and batches by itself (continuous batching, paged KV cache), so cutting
the list into batches here, as the hf generator must, would only take work away from its scheduler.

Prompts are rendered the way the rest of the package renders them. With a chat template the messages
go to ``LLM.chat``, which applies the template with the generation prompt and tokenizes without
special tokens, as :func:`orpo_distill.models.render_prompt` and training do. Without one the plain
text of :func:`render_plain` is tokenized here, without special tokens, and sent as token ids, so the
student sees the same prompt tokens from vLLM, from the hf generator and in training.

vLLM is an optional extra and is imported only inside :meth:`VLLMGenerator.from_config`; importing
this module never imports it. The constructor takes a built engine, so tests drive the generator
with a fake object that has vLLM's interface.

Weights for the mixed-policy refresh: :meth:`VLLMGenerator.load_weights` copies a torch model's
current weights into the running engine (see :func:`push_weights`, the one place that knows how);
:meth:`VLLMGenerator.from_checkpoint` builds a fresh engine from a saved folder where that fails.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..config import VLLMGeneratorConfig
from ..errors import UserError
from ..models import resolve_model
from .base import GenerationStats, Request, Sample, render_plain

INSTALL_HINT = "the vllm generator needs vLLM: pip install 'orpo-distill[vllm]' (Linux with a CUDA GPU)"

# our dtype names -> vLLM's; spelled out so that a new name on our side fails here, not inside vLLM
VLLM_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# vLLM imports this class by name in each of its worker processes and mixes it into the worker, so
# that collective_rpc can call its method by name (no pickled code crosses the process boundary).
WORKER_EXTENSION = f"{__name__}.WeightLoaderExtension"
LOAD_METHOD = "orpo_distill_load_weights"  # prefixed: must not clash with vLLM's own worker methods
BUCKET_BYTES = 256 * 1024**2  # per RPC message; msgpack caps one binary field at 4 GiB


class VLLMGenerator:
    """Samples from a ``vllm.LLM`` (or any object with its ``chat``/``generate``/``get_tokenizer``)."""

    def __init__(self, engine: Any, name: str, progress: bool = True, stop: Sequence[str] | None = None):
        self.engine = engine
        self.name = name
        self.progress = progress
        self.stop = list(stop) if stop else None
        self.stats = GenerationStats()
        self._params_cls = import_vllm().SamplingParams
        self.tokenizer = engine.get_tokenizer()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    @classmethod
    def from_config(cls, cfg: VLLMGeneratorConfig, progress: bool = True) -> "VLLMGenerator":
        """Build the engine a config names; ``builtin:`` models resolve as for the hf generator."""
        vllm = import_vllm()
        assert cfg.model is not None
        engine = vllm.LLM(
            model=resolve_model(cfg.model),
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=VLLM_DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.sampling.seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            worker_extension_cls=WORKER_EXTENSION,
        )
        return cls(engine, name=f"vllm:{cfg.model}", progress=progress, stop=cfg.stop)

    @classmethod
    def from_checkpoint(cls, path: str, cfg: VLLMGeneratorConfig, progress: bool = True) -> "VLLMGenerator":
        """A fresh engine on a saved checkpoint folder: the fallback where in-place loading fails.

        Close the old generator first (:meth:`close`): two engines rarely fit on one GPU.
        """
        return cls.from_config(cfg.model_copy(update={"model": str(path)}), progress=progress)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """One engine call for all requests; results come back in request order.

        vLLM rejects a bad request (say, a prompt longer than ``max_model_len``) with ``ValueError``
        for the whole call, so then each request is tried alone and only the bad ones fail.
        """
        if not requests:
            return []
        start = time.perf_counter()
        try:
            results = self._run(requests)
        except ValueError:
            results = [self._run_alone(r) for r in requests]
        self.stats.requests += len(requests)
        self.stats.samples += sum(1 for s in results for x in s if not x.failed)  # as the openai generator
        self.stats.failed_requests += sum(1 for s in results if any(x.failed for x in s))
        self.stats.completion_tokens += sum(x.num_tokens for s in results for x in s)
        self.stats.seconds += time.perf_counter() - start
        return results

    def _run(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """One engine call for all rows. A request for ``n`` samples becomes ``n`` rows of one sample,
        row ``j`` seeded ``request.sample_seed(j)``: a sample is then a function of (seed, question,
        sample index, weights) whatever else shares the call, as with the hf generator (vLLM's own
        ``n`` fan-out would tie the samples to ``n``). The prefix cache shares the prompt's prefill."""
        rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
        params = [self._sampling_params(requests[i], j) for i, j in rows]
        if self.chat:
            conversations = [[dict(m) for m in requests[i].messages] for i, _ in rows]
            outputs = self.engine.chat(conversations, sampling_params=params, use_tqdm=self.progress)
        else:
            ids = [self._plain_ids(r) for r in requests]
            prompts = [{"prompt_token_ids": ids[i]} for i, _ in rows]
            outputs = self.engine.generate(prompts, sampling_params=params, use_tqdm=self.progress)
        if len(outputs) != len(rows):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} rows of {len(requests)} requests")
        out: list[list[Sample]] = [[] for _ in requests]
        for (i, _), o in zip(rows, outputs):
            out[i].extend(_samples(o))
        return out

    def _run_alone(self, request: Request) -> list[Sample]:
        try:
            return self._run([request])[0]
        except ValueError as e:
            return [Sample(text="", error=f"vllm rejected the request: {e}") for _ in range(request.n)]

    def _sampling_params(self, r: Request, j: int) -> Any:
        return self._params_cls(n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                seed=r.sample_seed(j), stop=self.stop)

    def _plain_ids(self, r: Request) -> list[int]:
        return list(self.tokenizer.encode(render_plain(r.messages), add_special_tokens=False))

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, model: torch.nn.Module) -> int:
        """Put ``model``'s current weights into the running engine; returns how many tensors went.

        A PEFT model is merged for the copy and unmerged after, so vLLM gets plain weights under the
        base model's names. Raises ``RuntimeError`` when the engine cannot take weights in place;
        save the model and use :meth:`from_checkpoint` then.
        """
        with _merged(model):
            return push_weights(self.engine, _vllm_named_weights(model))

    def close(self) -> None:
        """Drop the engine so its GPU memory can be reused (vLLM shuts its workers down when collected)."""
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def import_vllm() -> Any:
    """vLLM, or a :class:`UserError` that says how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return vllm


def _samples(output: Any) -> list[Sample]:
    """``RequestOutput.outputs`` (one ``CompletionOutput`` per sample) in sample order."""
    completions = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
    return [Sample(text=c.text, num_tokens=len(c.token_ids), finish_reason=c.finish_reason) for c in completions]


# ---------------------------------------------------------------------------------------------
# weights into a running engine


def push_weights(engine: Any, named: Iterator[tuple[str, torch.Tensor]]) -> int:
    """The one place that knows how weights enter a running vLLM engine: change it when vLLM changes.

    How (vLLM >= 0.8.2, whose V1 engine takes ``worker_extension_cls``; V0 too): the engine is built
    with ``worker_extension_cls`` = :class:`WeightLoaderExtension`, and ``LLM.collective_rpc`` calls
    its method by name on every worker (a name, unlike a function, needs no insecure serialization).
    The tensors travel as safetensors bytes, because V1 sends RPC arguments through msgpack, which
    carries bytes but does not rebuild tensors. Each worker hands them to the model's own
    ``load_weights``, which maps checkpoint names to its fused layers and shards them for tensor
    parallelism. The prefix cache is reset after, or prompts cached under the old weights would be
    reused.
    """
    rpc = getattr(engine, "collective_rpc", None)
    if rpc is None:
        raise RuntimeError("this vLLM engine has no collective_rpc; rebuild it with VLLMGenerator.from_checkpoint")
    from safetensors.torch import save

    total = 0
    for bucket in _buckets(named, BUCKET_BYTES):
        counts = rpc(LOAD_METHOD, args=(save(dict(bucket)),))
        if not counts or any(c != len(bucket) for c in counts):
            raise RuntimeError(f"vLLM workers loaded {counts} tensors, expected {len(bucket)} each")
        total += len(bucket)
    reset = getattr(engine, "reset_prefix_cache", None)
    if reset is not None:
        reset()
    return total


class WeightLoaderExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); ``self`` is the worker there.

    vLLM imports this module by name in every worker process, which is one more reason it must not
    import vllm at module level.
    """

    model_runner: Any

    def orpo_distill_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

        weights = load(payload)
        self.model_runner.model.load_weights(weights=list(weights.items()))
        return len(weights)


def _buckets(named: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most ``max_bytes`` (a bigger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


@contextmanager
def _merged(model: Any) -> Iterator[None]:
    """LoRA deltas folded into the base weights for the duration, then taken out again."""
    if not _is_peft(model):
        yield
        return
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            model.unmerge_adapter()


def _vllm_named_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) under the names the base model's checkpoint uses, which vLLM expects.

    For a PEFT model the wrapper prefixes are stripped and the adapter's own tensors skipped (their
    effect is merged into the base weights); as in TRL's ``VLLMGeneration.sync_weights``.
    """
    peft = _is_peft(model)
    prefix: str = getattr(model, "prefix", "lora_")  # the adapter's parameter prefix, for PEFT models
    for name, param in model.named_parameters():
        if peft:
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if prefix in name or "original_module" in name:
                continue
            name = name.replace("modules_to_save.default.", "")
        yield name, param.detach().to("cpu").contiguous()
