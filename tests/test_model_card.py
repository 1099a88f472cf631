"""model/README.md, the model card (``model_card.py``), read back through huggingface_hub as the Hub reads it:
its metadata, a body without secrets, the card written at the export and again with the final evaluation,
and ``orpo-distill export RUN_DIR --push-to-hub REPO_ID`` up to the upload, with HfApi replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from orpo_distill import cli
from orpo_distill.config import build_config, set_dotted
from orpo_distill.layout import RunLayout
from orpo_distill.model_card import (
    TAGS,
    RunSizes,
    build_model_card,
    hub_dataset_id,
    hub_model_id,
    without_credentials,
    write_model_card,
)
from orpo_distill.provenance import code_version
from orpo_distill.store import atomic_write_json

from conftest import TINY_RUN, tiny_config_dict

SECRET_KEY = "sk-test-DO-NOT-LEAK-4f2a9c"
KEY_ENV = "ORPO_TEST_TEACHER_API_KEY"
SUMMARIES = {
    "eval_epoch_0": {"n": 40, "correct": 10, "accuracy": 0.25, "ci95": [0.142, 0.403]},
    "eval_epoch_1": {"n": 40, "correct": 20, "accuracy": 0.5, "ci95": [0.352, 0.648]},
    "eval_epoch_2": {"n": 40, "correct": 25, "accuracy": 0.625, "ci95": [0.468, 0.759]},
}


def hub_config(run_dir: Path, **overrides: Any) -> Any:
    """A run a user would publish: builtin student, an OpenAI-compatible teacher behind a URL carrying a
    user and password, its key in an environment variable, GSM8K from the Hub."""
    data = {
        "run_dir": str(run_dir),
        "dataset": {"kind": "hf", "path": "openai/gsm8k", "hf_config": "main",
                    "fields": {"question": "question", "answer": "answer"}},
        "task": {"kind": "numeric"},
        "teacher": {"kind": "openai", "model": "Qwen/Qwen2.5-72B-Instruct",
                    "base_url": "https://alice:hunter2@teacher.example.com/v1", "api_key_env": KEY_ENV},
        "student": {"kind": "hf", "model": "builtin:smollm2-135m-instruct"},
        "train": {"phi": 0.5, "epochs": 2, "lr": 2e-5, "lambda": 0.5},
    }
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return build_config(data, source="test")


def test_card_reads_back_with_the_hub_metadata_and_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    cfg = hub_config(tmp_path / "gsm8k-mixed")
    layout = RunLayout(tmp_path / "gsm8k-mixed")
    atomic_write_json(layout.eval_summary, SUMMARIES)
    folder = tmp_path / "model"
    path = write_model_card(folder, cfg, layout)
    assert path == folder / "README.md"

    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the builtin, as its Hub id
    assert {"orpo-distill", "distillation", "orpo"} <= set(data.tags)
    assert data.library_name == "transformers"
    assert data.datasets == ["openai/gsm8k"]
    # model-index: the held-out accuracy after the last epoch
    assert data.model_name == "gsm8k-mixed"
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.625)
    assert (result.dataset_type, result.dataset_config, result.task_type) == ("openai/gsm8k", "main", "text-generation")
    raw = path.read_text(encoding="utf-8")
    assert "model-index:" in raw

    text = card.text
    assert "`openai`" in text and "Qwen/Qwen2.5-72B-Instruct" in text  # the teacher: kind and model
    assert "orpo-mixed, phi 0.5" in text and "mixed policy" in text  # the variant and what it means
    assert "| lambda (weight of the odds-ratio term) | 0.5 |" in text
    assert "| phi (share of questions resampled from the current student per epoch) | 0.5 |" in text
    assert "| epochs | 2 |" in text and "| learning rate | 2e-05" in text
    # before and after, with the 95% interval; the epoch in between too
    assert "| held-out, before training | 40 | 25.0% | 14.2% to 40.3% |" in text
    assert "| held-out, after epoch 1 | 40 | 50.0% |" in text
    assert "| held-out, after epoch 2 (this model) | 40 | 62.5% | 46.8% to 75.9% |" in text
    assert code_version() in text
    # nothing secret: not the key, not the variable's name, not the URL's user and password, nor the URL
    for secret in (SECRET_KEY, KEY_ENV, "hunter2", "alice", "teacher.example.com"):
        assert secret not in raw, secret


def test_card_of_a_local_student_and_data_names_no_hub_ids(tmp_path: Path, tiny_model_dir: Path) -> None:
    data_file = tmp_path / "questions.jsonl"
    data_file.write_text('{"question": "q", "answer": "1"}\n', encoding="utf-8")
    cfg = build_config({**tiny_config_dict(tmp_path / "run", tiny_model_dir),
                        "dataset": {"kind": "jsonl", "path": str(data_file)}, "task": {"kind": "numeric"}})
    sizes = RunSizes(questions={"train": 12, "eval": 8}, teacher_traces=36, teacher_correct=30, pairs={1: 20, 2: 18})
    card = build_model_card(cfg, {}, sizes, "0.1.0+gabc1234")
    data = ModelCard(str(card)).data  # through the Hub's parser again
    assert data.base_model is None  # a local folder: the Hub refuses a path as base_model
    assert data.datasets is None  # local files: no Hub dataset
    assert data.eval_results is None  # no evaluation yet: no model-index
    assert set(TAGS) <= set(data.tags)
    text = card.text
    assert f"folder `{tiny_model_dir.name}`" in text and str(tiny_model_dir.parent) not in text
    assert "`questions.jsonl`" in text and str(tmp_path) not in text
    assert "scripted" in text
    assert "| training questions | 12 |" in text and "| held-out questions | 8 |" in text
    assert "| teacher traces | 36 (30 correct) |" in text
    assert "| pairs trained on in epoch 1 | 20 |" in text and "| pairs trained on in epoch 2 | 18 |" in text
    assert "No evaluation was recorded" in text


@pytest.mark.parametrize("overrides, variant, has_lambda, has_phi", [
    ({"train.method": "sft", "train.traces": "single"}, "sft-single", False, False),
    ({"train.method": "sft", "train.traces": "all"}, "sft-diverse", False, False),
    ({"pairs.negatives": "teacher"}, "orpo-teacher-neg", True, False),
    ({"train.phi": 0.0}, "orpo-off", True, True),
    ({"train.phi": 1.0}, "orpo-on", True, True),
])
def test_card_names_the_variant_and_only_its_knobs(tmp_path: Path, overrides: dict[str, Any], variant: str,
                                                   has_lambda: bool, has_phi: bool) -> None:
    text = build_model_card(hub_config(tmp_path / "r", **overrides), {}, RunSizes(), "v").text
    assert f"| variant | `{variant}`" in text
    assert ("| lambda" in text) is has_lambda
    assert ("| phi" in text) is has_phi


def test_hub_ids_and_credentials(tmp_path: Path) -> None:
    assert hub_model_id("builtin:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_model_id(str(tmp_path)) is None  # a local folder
    assert hub_dataset_id(hub_config(tmp_path / "r")) == "openai/gsm8k"
    assert hub_dataset_id(hub_config(tmp_path / "r", **{"dataset.path": str(tmp_path)})) is None  # a local dataset folder
    assert hub_dataset_id(hub_config(tmp_path / "r", **{"dataset": {"kind": "synthetic"}, "task.kind": "mcq"})) is None
    assert without_credentials("see https://bob:s3cret@host.example:8000/v1 and http://host/v1") == \
        "see https://host.example:8000/v1 and http://host/v1"
    assert without_credentials("https://token@host/v1") == "https://host/v1"


# ---- a trained run: the card at the export, then again with the final evaluation -----------------------

FAST = TINY_RUN  # eval.every_epoch false: the export's card has no evaluation


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A tiny run trained by the ``train`` stage alone (card written at the export), then run whole (the
    evaluations, and the card again). Returns the run folder and what the card said after ``train``."""
    import orpo_distill as od

    data = tiny_config_dict(tmp_path_factory.mktemp("card") / "tiny-run", tiny_model_dir)
    cfg = od.load_config(data, overrides=FAST)
    od.run_stage(cfg, "train", progress=False)
    model = Path(cfg.run_dir) / "model"
    after_export = {"card": ModelCard.load(model / "README.md"), "summary": RunLayout(Path(cfg.run_dir)).eval_summaries()}
    od.run(cfg, progress=False)
    return Path(cfg.run_dir), after_export


@pytest.mark.slow
def test_export_writes_the_card_and_the_run_rewrites_it_with_the_final_evaluation(
        trained_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, after_export = trained_run
    assert after_export["summary"] == {}  # no evaluation before the export ...
    assert after_export["card"].data.eval_results is None  # ... so no model-index yet
    assert "No evaluation was recorded" in after_export["card"].text
    assert set(TAGS) <= set(after_export["card"].data.tags)

    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    card = ModelCard.load(run_dir / "model" / "README.md")
    (result,) = card.data.eval_results  # the final evaluation, written after the export
    assert result.metric_type == "accuracy" and result.metric_value == round(summary["eval_epoch_2"]["accuracy"], 4)
    assert card.data.model_name == "tiny-run"
    assert "| held-out, before training | 2 |" in card.text and "| held-out, after epoch 2 (this model) | 2 |" in card.text
    assert "| training questions | 4 |" in card.text and "| held-out questions | 2 |" in card.text
    pairs = sum(1 for _ in (run_dir / "pairs" / "epoch_1.jsonl").open())
    assert f"| pairs trained on in epoch 1 | {pairs} |" in card.text


def test_a_rerun_leaves_the_card_alone(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    import orpo_distill as od

    run_dir = tmp_path / "tiny-run"  # the card's title is the folder's name
    shutil.copytree(trained_run[0], run_dir)
    card = run_dir / "model" / "README.md"
    before = (card.read_bytes(), card.stat().st_mtime_ns)
    od.run(od.load_config(run_dir / "config.yaml", overrides={"run_dir": str(run_dir)}), progress=False)
    assert (card.read_bytes(), card.stat().st_mtime_ns) == before


def test_weights_kept_with_reuse_keep_the_card_of_their_own_settings(trained_run: tuple[Path, dict[str, Any]],
                                                                     tmp_path: Path) -> None:
    import orpo_distill as od

    run_dir = tmp_path / "tiny-run"
    shutil.copytree(trained_run[0], run_dir)
    card = run_dir / "model" / "README.md"
    before = card.read_bytes()
    assert "| learning rate | 0.001 " in before.decode()
    cfg = od.load_config(run_dir / "config.yaml", overrides={"run_dir": str(run_dir), "train.lr": 5e-3})
    od.run(cfg, reuse=True, progress=False)  # the weights trained with lr 0.001 are kept on purpose
    assert card.read_bytes() == before  # so is the card that describes them
    assert cli.main(["export", str(run_dir)]) == 0  # config.yaml now says 0.005: still not these weights' card
    assert card.read_bytes() == before


# ---- orpo-distill export RUN_DIR [--push-to-hub REPO_ID [--private]] -------------------------------------

class FakeHfApi:
    """Records what would go to the Hub; nothing leaves the machine."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.calls.append(("init", kwargs))

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> None:
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir()),
                                             "card": (folder / "README.md").read_text(encoding="utf-8")}))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_never_written_9d1e")
    return FakeHfApi


def copy_run(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    return run_dir


def test_push_to_hub_creates_the_repo_and_uploads_model_with_its_card(
        trained_run: tuple[Path, dict[str, Any]], tmp_path: Path, hub: type[FakeHfApi],
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    assert cli.main(["export", str(run_dir), "--push-to-hub", "me/tiny-student", "--private"]) == 0
    assert f"uploaded {run_dir / 'model'} to https://huggingface.co/me/tiny-student" in capsys.readouterr().out
    names = [name for name, _ in hub.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert hub.calls[0][1] == {}  # no token handed over: huggingface_hub reads HF_TOKEN itself
    create, upload = hub.calls[1][1], hub.calls[2][1]
    assert create == {"repo_id": "me/tiny-student", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/tiny-student" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == run_dir / "model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "training_settings.json"} <= set(upload["files"])
    # the card uploaded is written for the repository: its name and how to load it from there
    assert upload["card"].startswith("---\n") and "\n# tiny-student\n" in upload["card"]
    assert 'model="me/tiny-student"' in upload["card"]
    # the token is never written anywhere in the run folder
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert b"hf_test_token_never_written_9d1e" not in p.read_bytes(), p


def test_push_public_by_default(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path, hub: type[FakeHfApi]) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    assert cli.main(["export", str(run_dir), "--push-to-hub", "tiny-student"]) == 0
    assert dict(hub.calls)["create_repo"]["private"] is False


def test_export_without_push_rewrites_the_card_only(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                    hub: type[FakeHfApi], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    card = run_dir / "model" / "README.md"
    card.unlink()
    assert cli.main(["export", str(run_dir)]) == 0
    assert str(card) in capsys.readouterr().out
    assert ModelCard.load(card).data.eval_results  # written again from config.yaml and eval/summary.json
    assert hub.calls == []


def test_export_refuses_a_run_without_a_model(tmp_path: Path, hub: type[FakeHfApi],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    assert cli.main(["export", str(tmp_path / "run"), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "no exported model" in err and "orpo-distill run" in err
    assert hub.calls == []


def test_export_refuses_weights_removed_by_compare(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                   hub: type[FakeHfApi], capsys: pytest.CaptureFixture[str]) -> None:
    from orpo_distill.compare.run import remove_weights

    run_dir = copy_run(trained_run, tmp_path)
    remove_weights(RunLayout(run_dir))  # what compare does to a finished run without --keep-models
    assert cli.main(["export", str(run_dir), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "removed" in err and "--keep-models" in err
    assert hub.calls == []


def test_push_refuses_without_a_token_or_with_a_bad_repo_id(
        trained_run: tuple[Path, dict[str, Any]], tmp_path: Path, hub: type[FakeHfApi],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    run_dir = copy_run(trained_run, tmp_path)
    assert cli.main(["export", str(run_dir), "--push-to-hub", "me/a/b"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--private"]) == 2
    assert "--private goes with --push-to-hub" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no `hf auth login`
    assert cli.main(["export", str(run_dir), "--push-to-hub", "me/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert hub.calls == []


def test_a_refused_upload_is_a_user_error(trained_run: tuple[Path, dict[str, Any]], tmp_path: Path,
                                          hub: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def forbidden(self: Any, repo_id: str, **kwargs: Any) -> None:
        response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("403 Forbidden: you cannot create a repository in this namespace", response=response)

    monkeypatch.setattr(FakeHfApi, "create_repo", forbidden)
    run_dir = copy_run(trained_run, tmp_path)
    assert cli.main(["export", str(run_dir), "--push-to-hub", "someone-else/x"]) == 2
    err = capsys.readouterr().err
    assert "upload of" in err and "someone-else/x" in err and "403" in err
