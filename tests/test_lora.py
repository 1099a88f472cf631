"""LoRA and QLoRA students (PEFT): the adapter in every checkpoint and in ``model/adapter``, the merged
``model/`` equal to base + adapter, a LoRA run that resumes, and the 4-bit path (config errors, the
refusal without bitsandbytes or a GPU, and what it asks of transformers and PEFT, checked without a GPU)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAIN, set_dotted, tiny_config_dict, write_config
from orpo_distill import cli, models
from orpo_distill.config import build_config
from orpo_distill.errors import UserError
from orpo_distill.metrics import read_metrics

# Two epochs of ORPO with the mixed-policy refresh (sampled from the PEFT model), one optimizer step each;
# fp32 so that a resume gives the same adapter bit for bit, and a high lr so the adapter visibly learns.
LORA_RUN = {
    **FAST_TRAIN,
    "dataset.eval_size": 2,
    "train.batch_size": 8,
    "train.lr": 5e-2,
    "train.warmup_ratio": 0.0,
    "train.lora.enabled": True,
    "train.lora.r": 4,
    "train.lora.alpha": 8,
}
IDS = torch.tensor([[1, 523, 9876, 42, 7, 30000, 12, 5]])


def make_config(run_dir: Path, model_dir: Path, **overrides: Any) -> Any:
    data = tiny_config_dict(run_dir, model_dir)
    for key, value in {**LORA_RUN, **overrides}.items():
        set_dotted(data, key, value)
    return build_config(data, source="test_lora")




def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def load_plain(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """One finished two-epoch LoRA run through `orpo-distill train` (shared: the tests below only read it)."""
    root = tmp_path_factory.mktemp("lora")
    cfg = make_config(root / "run", tiny_model_dir)
    config_file = write_config(cfg, root / "run.yaml")
    assert cli.main(["train", str(config_file), "--no-progress"]) == 0
    return {"dir": root / "run", "config": config_file, "cfg": cfg}


# ---- plain LoRA, end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_run_keeps_the_adapter_in_each_checkpoint_and_in_model_adapter(lora_run: dict[str, Any]) -> None:
    run = lora_run["dir"]
    for epoch in (1, 2):
        ckpt = run / "checkpoints" / f"epoch_{epoch}"
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
        assert not (ckpt / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter, not a full copy"
        state = json.loads((ckpt / "state.json").read_text())
        assert state["epoch"] == epoch and state["global_step"] == epoch  # one optimizer step per epoch

    model_dir, exported = run / "model", run / "model" / "adapter"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists(), "model/ itself is a plain model, not an adapter"
    assert (exported / "adapter_config.json").is_file() and (exported / "adapter_model.safetensors").is_file()
    peft_cfg = json.loads((exported / "adapter_config.json").read_text())
    assert (peft_cfg["peft_type"], peft_cfg["r"], peft_cfg["lora_alpha"]) == ("LORA", 4, 8)
    # model/adapter is the adapter after the last epoch
    final, last = adapter(exported), adapter(run / "checkpoints" / "epoch_2")
    assert final.keys() == last.keys() and final
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], adapter(run / "checkpoints" / "epoch_1")[k]) for k in final), \
        "epoch 2 did not change the adapter"
    # the refresh before epoch 2 sampled from the PEFT model in memory
    assert (run / "student" / "epoch_2.jsonl").is_file()


def test_merged_model_equals_base_plus_adapter_and_differs_from_base(lora_run: dict[str, Any],
                                                                      tiny_model_dir: Path) -> None:
    from peft import PeftModel

    run = lora_run["dir"]
    merged = load_plain(run / "model")  # plain transformers, no PEFT
    assert not any("lora" in k for k in merged.state_dict())
    base = load_plain(tiny_model_dir)
    base_logits = logits(copy.deepcopy(base))
    for source in (run / "model" / "adapter", run / "checkpoints" / "epoch_2"):
        adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(source))
        assert torch.allclose(logits(adapted), logits(merged), atol=1e-5), source
    assert (logits(merged) - base_logits).abs().max() > 1e-3, "the adapter learned nothing, so the comparison proves nothing"


@pytest.mark.slow
def test_lora_run_resumes_from_its_epoch_1_checkpoint_to_the_same_adapter(lora_run: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    """The finished run, cut back to its epoch-1 checkpoint, trains epoch 2 again to the same adapter."""
    done = lora_run["dir"]
    again = tmp_path / "run"
    shutil.copytree(done, again)
    shutil.rmtree(again / "checkpoints" / "epoch_2")
    shutil.rmtree(again / "model")
    (again / "metrics.jsonl").unlink()
    assert cli.main(["train", str(lora_run["config"]), "--set", f"run_dir={again}", "--no-progress"]) == 0

    resumes = [e for e in read_metrics(again / "metrics.jsonl") if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["epoch"] == 1
    assert [e["epoch"] for e in read_metrics(again / "metrics.jsonl") if e["event"] == "epoch"] == [2]
    for rel in ("checkpoints/epoch_2", "model/adapter"):
        a, b = adapter(again / rel), adapter(done / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}: {k} differs after the resume"
    assert torch.equal(logits(load_plain(again / "model")), logits(load_plain(done / "model")))


# ---- QLoRA: configuration and environment ---------------------------------------------------------------


def test_load_in_4bit_without_lora_is_a_config_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(UserError) as e:
        make_config(tmp_path / "run", tiny_model_dir, **{"train.lora.enabled": False, "train.lora.load_in_4bit": True})
    msg = str(e.value)
    assert "train.lora" in msg and "train.lora.load_in_4bit needs train.lora.enabled: true" in msg
    assert make_config(tmp_path / "run", tiny_model_dir, **{"train.lora.load_in_4bit": True}).train.lora.load_in_4bit


def test_load_in_4bit_with_a_vllm_student_that_refreshes_is_a_config_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    four_bit_vllm = {"train.lora.load_in_4bit": True, "student.kind": "vllm"}
    with pytest.raises(UserError, match=r"load_in_4bit with student.kind 'vllm'.*cannot take 4-bit weights"):
        make_config(tmp_path / "run", tiny_model_dir, **four_bit_vllm)
    # no refresh, no weight copy: allowed
    assert make_config(tmp_path / "run", tiny_model_dir, **four_bit_vllm, **{"train.policy": "off"})


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every from_pretrained of a model; the refusals below must come before any."""
    from transformers import AutoModelForCausalLM

    calls: list[str] = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda name, *a, **k: calls.append(name))
    return calls


@pytest.mark.parametrize("missing", ["bitsandbytes", "cuda"])
def test_train_with_load_in_4bit_is_refused_before_any_model_loads(
    missing: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], no_model_loads: list[str],
) -> None:
    monkeypatch.setattr(models, "_bitsandbytes_available", lambda: missing != "bitsandbytes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_config(tmp_path / "run", tiny_model_dir, **{"train.lora.load_in_4bit": True})
    config_file = write_config(cfg, tmp_path / "run.yaml")
    for command in ("train", "run"):
        assert cli.main([command, str(config_file), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "train.lora.load_in_4bit (QLoRA) needs" in err
        if missing == "bitsandbytes":
            assert "pip install 'orpo-distill[qlora]'" in err and "bitsandbytes>=" in err
        else:
            assert "needs a CUDA GPU" in err and "bitsandbytes>=" not in err
        assert "load_in_4bit=false" in err  # the way out on this machine
    assert no_model_loads == []
    assert not (tmp_path / "run" / "teacher").exists(), "refused before the first stage"


def test_load_student_refuses_4bit_before_loading(tiny_config: Any, monkeypatch: pytest.MonkeyPatch,
                                                  no_model_loads: list[str]) -> None:
    """Every way into training (compare too) goes through load_student, which checks again."""
    from orpo_distill.pipeline import Run

    monkeypatch.setattr(models, "_bitsandbytes_available", lambda: False)
    run = Run(tiny_config(**{"train.lora.enabled": True, "train.lora.load_in_4bit": True}), progress=False)
    with pytest.raises(UserError, match="needs bitsandbytes"):
        run.distiller().load_student(None)
    assert no_model_loads == []


def test_require_4bit_support_wants_the_student_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_bitsandbytes_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    models.require_4bit_support("auto")
    models.require_4bit_support("cuda:1")
    with pytest.raises(UserError, match="student.device is 'cpu'"):
        models.require_4bit_support("cpu")


# ---- QLoRA: the 4-bit path, without a GPU -----------------------------------------------------------


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_4bit_student_is_loaded_nf4_and_prepared_for_kbit_training(
    gradient_checkpointing: bool, resume: bool, tiny_config: Any, tiny_model_dir: Path,
    lora_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 4-bit load, with from_pretrained and PEFT's preparation recorded (the model itself loads in
    bf16: no bitsandbytes or GPU here), then the adapter: a new one, or the checkpoint's."""
    import peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from orpo_distill.pipeline import Run

    real_from_pretrained, real_prepare = AutoModelForCausalLM.from_pretrained, peft.prepare_model_for_kbit_training
    loads: list[tuple[str, dict[str, Any]]] = []
    prepared: list[dict[str, Any]] = []

    def from_pretrained(name: str, **kwargs: Any) -> Any:
        loads.append((name, kwargs))
        return real_from_pretrained(name, dtype=kwargs["dtype"])  # quantization_config / device_map need a GPU

    def prepare(model: Any, **kwargs: Any) -> Any:
        prepared.append({"model": model, **kwargs})
        return real_prepare(model, **kwargs)

    import orpo_distill.student_weights as student_weights

    checks: list[str] = []
    monkeypatch.setattr(student_weights, "require_4bit_support", checks.append)  # tested above; here: as if on a GPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    cfg = tiny_config(**{"train.lora.enabled": True, "train.lora.r": 4, "train.lora.alpha": 8,
                         "train.lora.load_in_4bit": True, "train.gradient_checkpointing": gradient_checkpointing,
                         "student.device": "auto"})
    ckpt = lora_run["dir"] / "checkpoints" / "epoch_1" if resume else None
    model = Run(cfg, progress=False).distiller().load_student(ckpt)

    assert checks == ["auto"] and len(loads) == 1
    name, kwargs = loads[0]
    assert name == str(tiny_model_dir)
    q = kwargs["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant is True
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": 0}

    assert len(prepared) == 1 and prepared[0]["use_gradient_checkpointing"] is gradient_checkpointing
    assert isinstance(model, PeftModel) and prepared[0]["model"] is model.get_base_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the adapter trains on a 4-bit base"
    assert model.is_activation_checkpointing is gradient_checkpointing
    if resume:  # the checkpoint's adapter, trainable
        saved = adapter(ckpt)
        state = model.state_dict()
        for k, v in saved.items():
            key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            assert torch.equal(state[key].float(), v.float()), k


def test_4bit_export_merges_into_a_reloaded_full_precision_base(tiny_config: Any, tiny_model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-bit base cannot be merged into plain weights: the export saves the adapter, reloads the base
    on the CPU in bf16 (student.dtype auto) and merges there. An fp32 PEFT model stands in for the
    4-bit one; it must come out of the export unmerged, with its adapter intact."""
    from peft import PeftModel

    from orpo_distill.pipeline import Run
    from orpo_distill.training import apply_lora

    cfg = tiny_config(**{"train.lora.enabled": True, "train.lora.r": 4, "train.lora.alpha": 8,
                         "train.lora.load_in_4bit": True})
    base = load_plain(tiny_model_dir)
    base_logits = logits(copy.deepcopy(base))
    model = apply_lora(base, cfg.train.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # lora_B starts at zero; make the adapter change the outputs
                p.normal_(0, 0.5)
    trained_logits = logits(model)

    loads: list[tuple[str, Any]] = []
    real_load_model = models.load_model

    def load_model(name: str, **kwargs: Any) -> Any:
        loads.append((name, kwargs))
        return real_load_model(name, **kwargs)

    import orpo_distill.student_weights as student_weights

    monkeypatch.setattr(student_weights, "load_model", load_model)
    target = Run(cfg, progress=False).distiller().export(model)

    assert loads == [(str(tiny_model_dir), {"dtype": "bfloat16", "trust_remote_code": False, "device": "cpu"})]
    assert any("lora_A" in n for n, _ in model.named_parameters()), "the in-memory model was merged"
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert {t.dtype for t in load_file(str(target / "model.safetensors")).values()} == {torch.bfloat16}
    assert (target / "adapter" / "adapter_config.json").is_file()

    merged = load_plain(target)
    assert not any("lora" in k for k in merged.state_dict())
    change = (trained_logits - base_logits).abs().max()
    assert change > 1e-2
    assert (logits(merged) - trained_logits).abs().max() < 0.1 * change, "merged model is not base + adapter (bf16)"
    # base + the exported adapter, in fp32, is the model that was trained
    again = PeftModel.from_pretrained(load_plain(tiny_model_dir), str(target / "adapter"))
    assert torch.allclose(logits(again), trained_logits, atol=1e-5)
