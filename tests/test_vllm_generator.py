"""The vllm generator against a fake engine with vLLM's interface (vLLM itself needs a CUDA GPU).

The fake ``vllm`` module has what the generator touches: ``LLM`` (``chat``, ``generate``,
``get_tokenizer``, ``collective_rpc``, ``reset_prefix_cache``), ``SamplingParams`` and the output
classes, with vLLM's attribute names (``RequestOutput.outputs``, ``CompletionOutput.text``,
``.token_ids``, ``.finish_reason``, ``.index``). Its workers mix in the class that
``worker_extension_cls`` names, imported by that name as vLLM does, so the weight-loading test runs
the real worker-side code.
"""

from __future__ import annotations

import zlib

import copy
import importlib
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from orpo_distill.config import DatasetConfig, generator_config, SamplingConfig
from orpo_distill.errors import UserError
from orpo_distill.generators import build_generator
from orpo_distill.generators import vllm as vllm_gen
from orpo_distill.generators.base import Request, render_plain
from orpo_distill.generators.vllm import INSTALL_HINT, VLLMGenerator

# ---------------------------------------------------------------------------------------------
# the fake vllm module


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    """Keeps every keyword it is given as an attribute, like vLLM's (keyword) ``SamplingParams``."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        for k, v in kwargs.items():
            setattr(self, k, v)


class FakeTokenizer:
    """Token ids are the UTF-8 bytes (+1000); ``add_special_tokens`` would prepend a BOS id of 1."""

    def __init__(self, chat_template: str | None):
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [1000 + b for b in text.encode("utf-8")]


class FakeModel:
    """The model inside a worker: records what ``load_weights`` received."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}
        self.calls = 0

    def load_weights(self, weights) -> set[str]:
        self.calls += 1
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()
        return {name for name, _ in weights}


class FakeLLM:
    """Answers every sample at once, in request order, as ``vllm.LLM`` does.

    Class attributes set per test: ``chat_template`` (None: a tokenizer without one), ``respond``
    (prompt text, params, sample index -> text), ``reject`` (a substring that makes the whole call
    raise ``ValueError``, as vLLM does for a prompt longer than ``max_model_len``).
    """

    instances: list["FakeLLM"] = []
    chat_template: str | None = "{{ messages }}"
    respond: Callable[[str, Any, int], str] = staticmethod(
        lambda prompt, p, i: f"{prompt} | sample {i} | seed {p.seed}"
    )
    reject: str | None = None

    def __init__(self, model: str, **kwargs: Any):
        self.model = model
        self.kwargs = kwargs
        self.calls: list[tuple[str, list[Any], list[SamplingParams], bool]] = []
        self.prefix_cache_resets = 0
        self.tokenizer = FakeTokenizer(type(self).chat_template)
        module, _, name = kwargs["worker_extension_cls"].rpartition(".")
        extension = getattr(importlib.import_module(module), name)  # resolved by name, as in vLLM
        worker_cls = type("FakeWorker", (extension,), {})
        self.workers = [worker_cls() for _ in range(kwargs.get("tensor_parallel_size", 1))]
        for w in self.workers:
            w.model_runner = types.SimpleNamespace(model=FakeModel())
        type(self).instances.append(self)

    def get_tokenizer(self) -> FakeTokenizer:
        return self.tokenizer

    def chat(self, messages, sampling_params=None, use_tqdm=True, **kwargs) -> list[RequestOutput]:
        self.calls.append(("chat", messages, sampling_params, use_tqdm))
        return self._answer([m[-1]["content"] for m in messages], sampling_params)

    def generate(self, prompts, sampling_params=None, use_tqdm=True, **kwargs) -> list[RequestOutput]:
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        texts = [bytes(t - 1000 for t in p["prompt_token_ids"]).decode("utf-8") for p in prompts]
        return self._answer(texts, sampling_params)

    def _answer(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        assert isinstance(params, list) and len(params) == len(prompts)
        if self.reject and any(self.reject in p for p in prompts):
            raise ValueError("The decoder prompt is longer than the maximum model length")
        out = []
        for k, (prompt, p) in enumerate(zip(prompts, params)):
            completions = []
            for i in range(p.n):
                text = type(self).respond(prompt, p, i)
                ids = list(range(min(p.max_tokens, len(text.split()))))
                reason = "length" if len(ids) == p.max_tokens else "stop"
                completions.append(CompletionOutput(index=i, text=text, token_ids=ids, finish_reason=reason))
            # parallel samples in reverse: the generator must order them by .index
            out.append(RequestOutput(str(k), prompt, None, completions[::-1]))
        return out

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list[Any]:
        return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True


@pytest.fixture
def fake_vllm(monkeypatch) -> types.ModuleType:
    """A fresh fake ``vllm`` in ``sys.modules``, with its own ``LLM`` subclass (no state leaks)."""
    module = types.ModuleType("vllm")
    module.LLM = type("LLM", (FakeLLM,), {"instances": []})
    module.SamplingParams = SamplingParams
    module.RequestOutput = RequestOutput
    module.CompletionOutput = CompletionOutput
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def vllm_config(**kw: Any) -> Any:
    return generator_config(kind="vllm", model=kw.pop("model", "org/teacher-model"), **kw)


def request(key: str, content: str, **kw: Any) -> Request:
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": content})
    return Request(key=key, messages=messages, **kw)


# ---------------------------------------------------------------------------------------------
# building the engine


def test_build_generator_dispatches_to_vllm_with_engine_settings(fake_vllm):
    cfg = vllm_config(
        tensor_parallel_size=2, dtype="bfloat16", trust_remote_code=True, gpu_memory_utilization=0.4,
        max_model_len=2048, sampling=SamplingConfig(seed=11),
    )
    gen = build_generator(cfg, progress=False)
    assert isinstance(gen, VLLMGenerator)
    assert gen.name == "vllm:org/teacher-model"
    (engine,) = fake_vllm.LLM.instances
    assert gen.engine is engine
    assert engine.model == "org/teacher-model"  # a Hub id passes through resolve_model unchanged
    assert engine.kwargs == {
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "trust_remote_code": True,
        "seed": 11,
        "gpu_memory_utilization": 0.4,
        "max_model_len": 2048,
        "worker_extension_cls": "orpo_distill.generators.vllm.WeightLoaderExtension",
    }


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_every_dtype_name_maps_to_vllm(fake_vllm, dtype):
    build_generator(vllm_config(dtype=dtype), progress=False)
    assert fake_vllm.LLM.instances[0].kwargs["dtype"] == dtype


def test_model_names_resolve_like_the_hf_generator(fake_vllm, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(vllm_gen, "resolve_model", lambda name: seen.append(name) or "/cache/smollm2")
    gen = build_generator(vllm_config(model="builtin:smollm2-135m-instruct"), progress=False)
    assert seen == ["builtin:smollm2-135m-instruct"]
    assert fake_vllm.LLM.instances[0].model == "/cache/smollm2"
    assert gen.name == "vllm:builtin:smollm2-135m-instruct"


def test_local_folder_without_config_is_a_user_error(fake_vllm, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        build_generator(vllm_config(model=str(tmp_path)), progress=False)
    assert fake_vllm.LLM.instances == []


def test_from_checkpoint_builds_a_new_engine_on_the_folder(fake_vllm, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = vllm_config(gpu_memory_utilization=0.3, stop=["###"])
    gen = VLLMGenerator.from_checkpoint(str(tmp_path), cfg, progress=False)
    (engine,) = fake_vllm.LLM.instances
    assert engine.model == str(tmp_path)
    assert engine.kwargs["gpu_memory_utilization"] == 0.3
    assert gen.stop == ["###"] and gen.name == f"vllm:{tmp_path}"
    assert cfg.model == "org/teacher-model"  # the config itself is left alone


# ---------------------------------------------------------------------------------------------
# the import guard


def test_missing_vllm_is_a_user_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError) as info:
        build_generator(vllm_config(), progress=False)
    assert str(info.value) == INSTALL_HINT
    assert "pip install 'orpo-distill[vllm]'" in str(info.value)


@pytest.mark.slow
def test_package_and_other_generators_never_import_vllm(tmp_path):
    replay = tmp_path / "traces.jsonl"
    replay.write_text('{"id": "q1", "text": "The answer is (A)."}\n')
    code = textwrap.dedent(
        f"""
        import sys
        import orpo_distill, orpo_distill.cli, orpo_distill.generators
        import orpo_distill.generators.vllm  # the backend module itself imports vllm only when used
        from orpo_distill.config import generator_config
        from orpo_distill.generators import build_generator
        build_generator(generator_config(kind="scripted"), records=[], progress=False)
        build_generator(generator_config(kind="replay", path={str(replay)!r}), progress=False)
        from orpo_distill.generators.hf import HFGenerator
        assert "vllm" not in sys.modules, "vllm was imported"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.slow
def test_hf_generator_build_does_not_import_vllm(tiny_model_dir):
    code = textwrap.dedent(
        f"""
        import sys
        from orpo_distill.config import generator_config
        from orpo_distill.generators import build_generator
        g = build_generator(generator_config(kind="hf", model={str(tiny_model_dir)!r}, device="cpu"), progress=False)
        assert type(g).__name__ == "HFGenerator"
        assert "vllm" not in sys.modules, "vllm was imported"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# requests in, samples out


def test_requests_map_to_one_chat_call_with_per_request_sampling_params(fake_vllm):
    gen = build_generator(vllm_config(stop=["</answer>", "###"]), progress=False)
    requests = [
        request("q1", "first question", n=2, temperature=0.8, top_p=0.9, max_tokens=64, seed=7),
        request("q2", "second question", n=1, temperature=0.0, top_p=1.0, max_tokens=3, seed=None),
        request("q3", "third question", n=3, temperature=1.2, top_p=0.5, max_tokens=128, seed=123),
    ]
    results = gen.generate(requests)

    (engine,) = fake_vllm.LLM.instances
    assert len(engine.calls) == 1  # vLLM batches by itself: one call for the whole list
    kind, messages, params, use_tqdm = engine.calls[0]
    assert kind == "chat" and use_tqdm is False
    # one row per sample, seeded request.seed + sample index (the hf generator's contract, issue 12)
    rows = [(r, j) for r in requests for j in range(r.n)]
    assert messages == [[dict(m) for m in r.messages] for r, _ in rows]
    assert [p.kwargs for p in params] == [
        {"n": 1, "temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens,
         "seed": r.sample_seed(j), "stop": ["</answer>", "###"]}
        for r, j in rows
    ]
    assert [p.kwargs["seed"] for p in params[:2]] == [7, 8]  # sample j of a seeded request: seed + j
    assert params[2].kwargs["seed"] == zlib.crc32(b"q2")  # an unseeded request is seeded from its key

    # request order kept, samples in index order, token counts from token_ids
    assert [len(s) for s in results] == [2, 1, 3]
    assert [s.text for s in results[0]] == ["first question | sample 0 | seed 7", "first question | sample 0 | seed 8"]
    assert [s.text for s in results[2]] == [f"third question | sample 0 | seed {123 + i}" for i in range(3)]
    assert results[1][0].text == f"second question | sample 0 | seed {zlib.crc32(b'q2')}"
    assert results[1][0].num_tokens == 3 and results[1][0].finish_reason == "length"  # capped by max_tokens=3
    assert results[0][0].num_tokens == 8 and results[0][0].finish_reason == "stop"
    assert not any(s.failed for samples in results for s in samples)

    total_tokens = sum(s.num_tokens for samples in results for s in samples)
    assert (gen.stats.requests, gen.stats.samples, gen.stats.completion_tokens) == (3, 6, total_tokens)
    assert gen.stats.failed_requests == 0 and gen.stats.seconds > 0

    gen.generate(requests[:1])  # stats add up across calls
    assert (gen.stats.requests, gen.stats.samples) == (4, 8)


def test_no_stop_sequences_sends_none_and_progress_reaches_tqdm(fake_vllm):
    gen = build_generator(vllm_config(), progress=True)
    gen.generate([request("q1", "hello")])
    _, _, params, use_tqdm = fake_vllm.LLM.instances[0].calls[0]
    assert params[0].stop is None and use_tqdm is True


def test_empty_request_list_does_not_call_the_engine(fake_vllm):
    gen = build_generator(vllm_config(), progress=False)
    assert gen.generate([]) == []
    assert fake_vllm.LLM.instances[0].calls == [] and gen.stats.requests == 0


def test_without_chat_template_plain_text_is_sent_as_token_ids(fake_vllm):
    fake_vllm.LLM.chat_template = None
    gen = build_generator(vllm_config(), progress=False)
    requests = [request("q1", "What is 2+2?", n=2, seed=3), request("q2", "Name a colour.", max_tokens=5)]
    results = gen.generate(requests)

    (engine,) = fake_vllm.LLM.instances
    assert [c[0] for c in engine.calls] == ["generate"]
    _, prompts, params, _ = engine.calls[0]
    # the plain rendering, tokenized without special tokens (no BOS), as training tokenizes it
    tok = FakeTokenizer(None)
    expected = [tok.encode(render_plain(r.messages), add_special_tokens=False) for r in requests]
    assert prompts == [{"prompt_token_ids": ids} for ids in [expected[0], expected[0], expected[1]]]  # a row a sample
    assert 1 not in prompts[0]["prompt_token_ids"]
    assert [p.n for p in params] == [1, 1, 1] and [p.max_tokens for p in params] == [256, 256, 5]
    assert results[0][1].text == f"{render_plain(requests[0].messages)} | sample 0 | seed 4"
    assert [len(s) for s in results] == [2, 1]


def test_a_rejected_request_fails_alone_and_the_others_are_kept(fake_vllm):
    fake_vllm.LLM.reject = "TOO LONG"
    gen = build_generator(vllm_config(), progress=False)
    requests = [request("q1", "fine"), request("q2", "TOO LONG " * 5, n=2), request("q3", "also fine")]
    results = gen.generate(requests)

    engine = fake_vllm.LLM.instances[0]
    assert len(engine.calls) == 4  # the whole list once, then each request alone
    assert [s.text for s in results[0]] == [f"fine | sample 0 | seed {zlib.crc32(b'q1')}"]
    assert [s.text for s in results[2]] == [f"also fine | sample 0 | seed {zlib.crc32(b'q3')}"]
    assert len(results[1]) == 2 and all(s.failed and "maximum model length" in s.error for s in results[1])
    assert (gen.stats.requests, gen.stats.samples, gen.stats.failed_requests) == (3, 2, 1)


def test_other_engine_errors_propagate(fake_vllm, monkeypatch):
    gen = build_generator(vllm_config(), progress=False)

    def broken(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gen.engine, "chat", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.generate([request("q1", "hello")])


def test_wrong_number_of_outputs_is_an_error_not_a_silent_shift(fake_vllm, monkeypatch):
    gen = build_generator(vllm_config(), progress=False)
    real = gen.engine.chat
    monkeypatch.setattr(gen.engine, "chat", lambda *a, **kw: real(*a, **kw)[:-1])
    with pytest.raises(RuntimeError, match="2 outputs for 3 rows of 3 requests"):
        gen.generate([request(f"q{i}", f"question {i}") for i in range(3)])


# ---------------------------------------------------------------------------------------------
# weights into the running engine


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_weights_delivers_every_parameter_to_every_worker(fake_vllm, monkeypatch, dtype):
    monkeypatch.setattr(vllm_gen, "BUCKET_BYTES", 4096)  # several RPC messages for this small model
    gen = build_generator(vllm_config(tensor_parallel_size=2), progress=False)
    model = tiny_llama().to(dtype)
    with torch.no_grad():  # as after a training step: not the weights the engine was built from
        for p in model.parameters():
            p.add_(0.5)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    sent = gen.load_weights(model)

    assert sent == len(expected)
    engine = fake_vllm.LLM.instances[0]
    for worker in engine.workers:  # each tensor-parallel worker gets every tensor (it shards them itself)
        loaded = worker.model_runner.model.loaded
        assert set(loaded) == set(expected)
        for name, tensor in expected.items():
            assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor), name
        assert worker.model_runner.model.calls > 1  # split into buckets
    assert "lm_head.weight" not in expected  # tied: sent once, as the embedding
    assert engine.prefix_cache_resets == 1  # no prompt cached under the old weights is reused


def test_load_weights_merges_a_lora_adapter_and_sends_base_names(fake_vllm):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # lora_B starts at zero; make the adapter change the weights
                p.normal_(0.0, 0.5)
    merged = {k: v.clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}
    gen = build_generator(vllm_config(), progress=False)

    gen.load_weights(peft_model)

    loaded = fake_vllm.LLM.instances[0].workers[0].model_runner.model.loaded
    assert set(loaded) == set(original)  # base names only: no base_model./base_layer/lora_ names
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded[q], original[q])  # the adapter's delta is in
    for name in loaded:
        assert torch.allclose(loaded[name], merged[name], atol=1e-6), name
    # and the training model is unmerged again (W + BA - BA: equal up to float rounding)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q_proj.merged
    assert torch.allclose(q_proj.base_layer.weight, original[q], atol=1e-6)


def test_load_weights_refuses_when_workers_load_fewer_tensors(fake_vllm):
    gen = build_generator(vllm_config(), progress=False)
    worker = gen.engine.workers[0]
    worker.orpo_distill_load_weights = lambda payload: 0
    with pytest.raises(RuntimeError, match="loaded \\[0\\] tensors"):
        gen.load_weights(tiny_llama())


def test_engine_without_collective_rpc_points_to_from_checkpoint(fake_vllm):
    engine = types.SimpleNamespace(get_tokenizer=lambda: FakeTokenizer("t"))
    gen = VLLMGenerator(engine, name="vllm:old", progress=False)
    with pytest.raises(RuntimeError, match="from_checkpoint"):
        gen.load_weights(tiny_llama())


def test_close_drops_the_engine(fake_vllm):
    gen = build_generator(vllm_config(), progress=False)
    gen.close()
    assert gen.engine is None


# ---------------------------------------------------------------------------------------------
# end to end through the sampling stage


def test_sample_traces_end_to_end_with_the_fake_engine(fake_vllm, tmp_path):
    from orpo_distill.datasets import load_splits
    from orpo_distill.sampling import request_seed, sample_traces
    from orpo_distill.store import TraceStore, read_jsonl
    from orpo_distill.tasks import build_task

    records = load_splits(DatasetConfig(train_size=5, eval_size=1))[0]
    task = build_task("mcq")
    gold = {r.question: r.answer for r in records}

    def respond(prompt: str, params: Any, i: int) -> str:
        """Right on even seeds, a wrong letter on odd ones (each row carries its own seed)."""
        answer = next(a for q, a in gold.items() if q in prompt)
        wrong = "B" if answer != "B" else "C"
        return f"Step by step reasoning. The answer is ({answer if params.seed % 2 == 0 else wrong})."

    fake_vllm.LLM.respond = staticmethod(respond)
    gen = build_generator(vllm_config(), progress=False)
    sampling = SamplingConfig(samples=3, temperature=0.7, max_tokens=32, seed=5)
    store = TraceStore(tmp_path / "traces.jsonl", "h")

    summary = sample_traces(records, task, gen, sampling, store, "teacher", chunk_questions=2, progress=False)

    engine = fake_vllm.LLM.instances[0]
    assert len(engine.calls) == 3  # chunks of 2, 2 and 1 questions, one engine call each
    params = [p for call in engine.calls for p in call[2]]
    assert [p.seed for p in params] == [request_seed(5, r.id, 0) + j for r in records for j in range(3)]
    assert all(p.n == 1 and p.temperature == 0.7 and p.max_tokens == 32 for p in params)
    assert summary.samples == summary.new_samples == 15 and summary.questions == 5
    assert summary.correct == sum(1 for p in params if p.seed % 2 == 0) and summary.no_positive == 0 and summary.parse_failures == 0
    assert summary.failed_requests == 0 and summary.completion_tokens == gen.stats.completion_tokens > 0
    rows = list(read_jsonl(store.path))
    assert {r["generator"] for r in rows} == {"vllm:org/teacher-model"}
    assert sorted((r["id"], r["sample"]) for r in rows) == sorted((r.id, i) for r in records for i in range(3))
    seeds = {(r.id, j): request_seed(5, r.id, 0) + j for r in records for j in range(3)}
    assert all(r["correct"] == (seeds[r["id"], r["sample"]] % 2 == 0) for r in rows)

    again = sample_traces(records, task, gen, sampling, TraceStore(store.path, "h"), "teacher", progress=False)
    assert len(engine.calls) == 3 and again.samples == 15  # a complete store asks for nothing


# ---------------------------------------------------------------------------------------------
# the student's mixed-policy refresh through vLLM


@pytest.mark.slow
def test_refresh_with_a_vllm_student_pushes_the_current_weights_then_samples(fake_vllm, tiny_config, tmp_path):
    """student.kind vllm: before the epoch-2 refresh the engine gets the weights the model has after
    epoch 1 (those of checkpoints/epoch_1), and the refreshed samples come from that engine."""
    from safetensors.torch import load_file

    from orpo_distill.pipeline import Run

    cfg = tiny_config(**{
        "student.kind": "vllm", "dataset.train_size": 4, "teacher.error_rate": 0.0,
        "student.sampling.samples": 2, "train.policy": "mixed", "train.phi": 1.0, "train.epochs": 2,
        "train.batch_size": 2, "train.lr": 1e-2, "train.precision": "fp32", "train.max_length": 128,
        "eval.every_epoch": False, "eval.before_training": False,
    })
    run = Run(cfg, progress=False)
    run.teacher()
    run.student(epoch=1)  # the initial student through the engine too
    run.train()
    refresh_engine = fake_vllm.LLM.instances[-1]
    assert len(fake_vllm.LLM.instances) == 2  # one for the initial samples, one kept for the refreshes
    loaded = refresh_engine.workers[0].model_runner.model.loaded
    after_epoch_1 = load_file(str(run.dir / "checkpoints" / "epoch_1" / "model.safetensors"))
    assert loaded and set(loaded) <= set(after_epoch_1)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, after_epoch_1[name]), name
    base = load_file(str(cfg.student.model) + "/model.safetensors")
    assert any(not torch.equal(loaded[n], base[n]) for n in loaded)  # epoch 1 changed them
    rows = [r for r in run.student_store(2, "vllm:student@epoch_1").all_rows()]
    assert len(rows) == 2 * 4 and {r["generator"] for r in rows} == {"vllm:student@epoch_1"}
    assert refresh_engine.calls and refresh_engine.prefix_cache_resets == 1
