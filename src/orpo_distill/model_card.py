"""The exported student as a Hugging Face user expects it: ``model/README.md``, a model card with the Hub's
metadata (``base_model``, ``tags``, ``datasets``, ``model-index``) and a body that says how it was made,
and the upload of ``model/`` to a Hub repository.

:func:`build_model_card` is pure: the card from the config, the evaluations (``eval/summary.json``), the
data sizes (:func:`run_sizes`) and the code version. :func:`write_model_card` writes it; the export writes
it with the evaluations known then, and :func:`refresh_model_card` writes it again once the final
evaluation exists (the export comes before it). :func:`push_to_hub` uploads the folder.

Nothing secret enters a card: the teacher is named by its kind and model only (never a server URL, an API
key or the name of the variable holding one), and any ``user:password@`` in a name shown is removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import RunConfig, phi_text
from .errors import UserError
from .layout import RunLayout, eval_key, eval_key_epoch

CARD = "README.md"  # in model/: the model card the Hub shows
TAGS = ["orpo-distill", "distillation", "orpo"]
# builtin students and the Hub models they are
HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PAPER = "ORPO-Distill (Singh, Vaddina, Birru, arXiv 2509.25100)"

_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_TEACHER_KINDS = {
    "hf": "a local transformers model",
    "vllm": "a local vLLM engine",
    "openai": "an OpenAI-compatible server",
    "replay": "recorded traces",
    "scripted": "the synthetic task's scripted teacher (a program, no model)",
}


@dataclass(frozen=True)
class RunSizes:
    """How much data the run had: questions per split, teacher traces, pairs per epoch (absent: unknown)."""

    questions: dict[str, int] = field(default_factory=dict)  # split ("train", "eval", "dev") -> questions
    teacher_traces: int | None = None
    teacher_correct: int | None = None
    pairs: dict[int, int] = field(default_factory=dict)  # epoch -> rows trained on


def without_credentials(text: str) -> str:
    """``https://user:pass@host/v1`` -> ``https://host/v1``; any other text unchanged."""
    return _CREDENTIALS.sub(r"\1", text)


def hub_model_id(source: str) -> str | None:
    """The Hub id a student model names: a builtin's, or the name itself when it reads as a Hub id and is no
    local folder. None for a local folder, which the Hub refuses as ``base_model``."""
    if source in HUB_IDS:
        return HUB_IDS[source]
    if Path(source).exists() or not _HUB_ID.match(source):
        return None
    return source


def hub_dataset_id(cfg: RunConfig) -> str | None:
    """The dataset's Hub id: an ``hf`` dataset read from the Hub; None for local files and the synthetic task."""
    d = cfg.dataset
    if d.kind != "hf" or not d.path or Path(d.path).exists() or not _HUB_ID.match(d.path):
        return None
    return d.path


def variant(cfg: RunConfig) -> tuple[str, str]:
    """The variant's name (as ``compare`` names them) and what it means."""
    t, negatives = cfg.train, cfg.pairs.negatives
    if t.method == "sft":
        if t.traces == "single":
            return "sft-single", ("supervised fine-tuning on one correct teacher trace per question "
                                  "(chain-of-thought distillation)")
        return "sft-diverse", "supervised fine-tuning on all the teacher's correct traces per question"
    if negatives == "teacher":
        return "orpo-teacher-neg", "ORPO with a correct teacher trace as chosen and a wrong teacher trace as rejected"
    rest = "the initial student's" if t.unrefreshed == "initial" else "the previous epoch's"
    name, meaning = {
        "off": ("orpo-off", "the initial student's wrong traces as rejected, never resampled (off-policy)"),
        "on": ("orpo-on", "rejected traces resampled from the current student before every epoch (on-policy)"),
        "mixed": (f"orpo-mixed, phi {phi_text(t.phi)}",
                  f"before each epoch after the first, a share phi of the questions get rejected traces resampled "
                  f"from the current student, the others keep {rest} (mixed policy)"),
    }[t.policy]
    if negatives == "both":
        name, meaning = name + ", student and teacher negatives", meaning + "; teacher negatives too"
    return name, f"ORPO with a correct teacher trace as chosen; {meaning}"


def _teacher_lines(cfg: RunConfig) -> list[str]:
    t = cfg.teacher
    kind = _TEACHER_KINDS.get(t.kind, t.kind)
    if t.kind == "scripted":
        return [f"- kind: `scripted`, {kind}"]
    # a replay file and a local model folder are named by their last part only
    name = Path(t.source).name if t.kind == "replay" or Path(t.source).exists() else t.source
    return [f"- kind: `{t.kind}` ({kind})", f"- model: `{without_credentials(name)}`"]


def _dataset_text(cfg: RunConfig) -> str:
    d = cfg.dataset
    hub = hub_dataset_id(cfg)
    if hub:
        return f"`{hub}`" + (f" (configuration `{d.hf_config}`)" if d.hf_config else "") + " from the Hugging Face Hub"
    if d.kind == "synthetic":
        return "the built-in synthetic arithmetic task (offline)"
    shown = Path(d.path).name if d.path else "(none)"
    return f"local {d.kind} data (`{without_credentials(shown)}`)"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


_SPLITS = {"eval": "held-out", "train": "training questions", "dev": "dev"}


def _eval_label(epoch: int, split: str, epochs: int) -> str:
    what = "before training" if epoch == 0 else f"after epoch {epoch}" + (" (this model)" if epoch == epochs else "")
    return f"{_SPLITS.get(split, split)}, {what}"


def _eval_rows(cfg: RunConfig, summaries: Mapping[str, Any]) -> list[str]:
    """A row per evaluation of the held-out split (then the dev split), by epoch."""
    rows = []
    for split in dict.fromkeys([cfg.eval.split, "dev"]):
        keyed = sorted((eval_key_epoch(k, split), k) for k in summaries if eval_key_epoch(k, split) is not None)
        for epoch, key in keyed:
            s = summaries[key]
            lo, hi = s.get("ci95", (None, None))
            ci = f"{_pct(lo)} to {_pct(hi)}" if lo is not None else ""
            label = _eval_label(epoch, split, cfg.train.epochs)
            rows.append(f"| {label} | {s.get('n', '')} | {_pct(s['accuracy'])} | {ci} |")
    return rows


def _eval_results(cfg: RunConfig, summaries: Mapping[str, Any]) -> list[Any]:
    """The model-index entry: held-out accuracy after the last epoch, when it is known."""
    from huggingface_hub import EvalResult

    final = summaries.get(eval_key(cfg.eval.split, cfg.train.epochs))
    if cfg.eval.split != "eval" or final is None:
        return []
    hub = hub_dataset_id(cfg)
    return [EvalResult(task_type="text-generation", task_name="Question answering with reasoning",
                       dataset_type=hub or cfg.dataset.kind, dataset_name=_dataset_name(cfg),
                       dataset_config=cfg.dataset.hf_config if hub else None,
                       dataset_split="held-out",  # eval_split, or a share set aside from a one-split source
                       metric_type="accuracy", metric_value=round(float(final["accuracy"]), 4),
                       metric_name="accuracy (greedy, held-out questions)")]


def _dataset_name(cfg: RunConfig) -> str:
    hub = hub_dataset_id(cfg)
    if hub:
        return hub
    if cfg.dataset.kind == "synthetic":
        return "synthetic arithmetic (orpo-distill)"
    return without_credentials(Path(cfg.dataset.path).name) if cfg.dataset.path else cfg.dataset.kind


def build_model_card(cfg: RunConfig, summaries: Mapping[str, Any], sizes: RunSizes, code: str,
                     repo_id: str | None = None) -> Any:
    """The ``huggingface_hub.ModelCard`` of the student ``cfg`` trains, given ``eval/summary.json``'s
    entries, the data sizes and the code version. ``repo_id``: the Hub repository it goes to, whose name
    is then the title and the model-index name (else the run folder's name)."""
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id.split("/")[-1] if repo_id else Path(cfg.run_dir).name
    student = cfg.student.source
    base = hub_model_id(student)
    results = _eval_results(cfg, summaries)
    dataset = hub_dataset_id(cfg)
    data = ModelCardData(base_model=base, tags=list(TAGS), library_name="transformers", pipeline_tag="text-generation",
                         datasets=[dataset] if dataset else None, eval_results=results or None,
                         model_name=name if results else None)
    t = cfg.train
    variant_name, meaning = variant(cfg)
    shown_student = f"`{base}`" if base else f"(a local model, folder `{Path(student).name}`)"
    lines = [
        f"# {name}",
        "",
        f"The student {shown_student} after distillation of a teacher's step-by-step reasoning with orpo-distill's "
        f"`{variant_name}` recipe, after {PAPER}. Only the teacher's text was used (black-box distillation).",
        "",
        "## Teacher",
        "",
        *_teacher_lines(cfg),
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| method | `{t.method}` |",
        f"| variant | `{variant_name}`: {meaning} |",
    ]
    if t.method == "orpo":
        lines.append(f"| lambda (weight of the odds-ratio term) | {t.lambda_or:g} |")
        if cfg.pairs.negatives != "teacher":
            lines.append("| phi (share of questions resampled from the current student per epoch) | "
                         f"{phi_text(t.phi)} |")
    lines += [
        f"| epochs | {t.epochs} |",
        f"| learning rate | {t.lr:g} ({t.scheduler}, warmup {t.warmup_ratio:g}) |",
        f"| batch size | {t.batch_size} pairs x {t.grad_accum} accumulation |",
        f"| weights trained | {'LoRA r ' + str(t.lora.r) + ', merged' if t.lora.enabled else 'all'} |",
        f"| seed | {cfg.seed} |",
        "",
        "## Data",
        "",
        f"Questions: {_dataset_text(cfg)}, task `{cfg.task.kind}`.",
        "",
        "| what | count |",
        "| --- | --- |",
    ]
    names = {"train": "training questions", "eval": "held-out questions", "dev": "dev questions"}
    lines += [f"| {names.get(split, split)} | {n} |" for split, n in sizes.questions.items()]
    if sizes.teacher_traces is not None:
        correct = f" ({sizes.teacher_correct} correct)" if sizes.teacher_correct is not None else ""
        lines.append(f"| teacher traces | {sizes.teacher_traces}{correct} |")
    lines += [f"| {'pairs' if t.method == 'orpo' else 'examples'} trained on in epoch {e} | {n} |"
              for e, n in sorted(sizes.pairs.items())]
    rows = _eval_rows(cfg, summaries)
    lines += ["", "## Evaluation", ""]
    if rows:
        lines += ["Greedy decoding with the training prompt; accuracy is the share of questions whose extracted "
                  "answer is correct, with its 95% (Wilson) interval.", "",
                  "| evaluation | questions | accuracy | 95% interval |", "| --- | --- | --- | --- |", *rows]
    else:
        lines.append("No evaluation was recorded for this model.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{repo_id or "PATH_TO/model"}")',
        'print(generator([{"role": "user", "content": "..."}], max_new_tokens=256)[0]["generated_text"])',
        "```",
        "",
        "## Provenance",
        "",
        f"Made by orpo-distill `{code}`. `training_settings.json` holds every setting that determined the weights.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def run_sizes(layout: RunLayout) -> RunSizes:
    """What :class:`RunSizes` the run folder's files tell: the questions by split (``prompts/student.jsonl``),
    the teacher traces, and the rows of each ``pairs/epoch_E.jsonl``."""
    from .layout import epoch_of
    from .store import read_jsonl

    questions: dict[str, int] = {}
    if layout.prompts("student").is_file():
        for row in read_jsonl(layout.prompts("student")):
            questions[row["split"]] = questions.get(row["split"], 0) + 1
    traces = correct = None
    if layout.teacher_traces.is_file():
        rows = list(read_jsonl(layout.teacher_traces))
        traces, correct = len(rows), sum(1 for r in rows if r.get("correct"))
    pairs = {}
    for path in sorted(layout.pairs(1).parent.glob("epoch_*.jsonl")):
        epoch = epoch_of(path)
        if epoch is not None:
            pairs[epoch] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return RunSizes(questions=questions, teacher_traces=traces, teacher_correct=correct, pairs=pairs)


def write_model_card(folder: Path, cfg: RunConfig, layout: RunLayout, repo_id: str | None = None) -> Path:
    """``folder/README.md``: the card of the student exported to ``folder`` from the run at ``layout``
    (left alone when unchanged, so that a rerun that does nothing writes nothing)."""
    from .provenance import code_version
    from .store import atomic_write_text

    text = str(build_model_card(cfg, layout.eval_summaries(), run_sizes(layout), code_version(), repo_id))
    path = Path(folder) / CARD
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def refresh_model_card(cfg: RunConfig, layout: RunLayout, repo_id: str | None = None) -> Path | None:
    """Write ``model/README.md`` again with the evaluations recorded since the export. None, the card left
    alone, when the run has no exported model (not trained yet, or its weights removed by ``compare``), or
    when ``cfg`` did not train it (``--reuse`` kept weights trained with other settings: the card written
    at their export describes them)."""
    import json

    from .provenance import changes

    if not layout.has_model():
        return None
    if layout.model_settings.is_file():
        if changes(json.loads(layout.model_settings.read_text(encoding="utf-8")), cfg):
            return None
    return write_model_card(layout.model, cfg, layout, repo_id)


def exportable_model(run_dir: Path) -> RunLayout:
    """The run at ``run_dir``, refused with a UserError when it has no exported model to publish."""
    layout = RunLayout(Path(run_dir))
    if layout.model_removed.is_file():
        raise UserError(f"{layout.model}: `orpo-distill compare` removed this run's weights "
                        f"({layout.model_removed.name}); run the comparison with --keep-models, or train the run "
                        "alone, to get weights to publish")
    if not layout.has_model():
        raise UserError(f"{layout.model}: no exported model (config.json missing); finish training with "
                        "`orpo-distill run` or `orpo-distill train` first")
    return layout


def export_card(run_dir: Path, repo_id: str | None = None) -> Path:
    """``run_dir/model/README.md`` written again from the run folder (its config.yaml and evaluations),
    for the Hub repository ``repo_id`` when given; refused when the run has no exported model."""
    from .config import load_config

    layout = exportable_model(run_dir)
    if layout.config.is_file():
        refresh_model_card(load_config(layout.config), layout, repo_id)
    return layout.model / CARD


def push_to_hub(run_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``run_dir/model/`` (its card written again first, :func:`export_card`) to the Hub model
    repository ``repo_id``, created if needed. The token is huggingface_hub's own (``HF_TOKEN``, or
    ``hf auth login``), read for this upload only and never written anywhere. Returns the repository's URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    layout = exportable_model(run_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hub repository id (NAME or OWNER/NAME): {e}") from None
    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`")
    export_card(run_dir, repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(layout.model), repo_type="model",
                          commit_message="Upload a student distilled with orpo-distill")
    except HfHubHTTPError as e:
        raise UserError(f"upload of {layout.model} to {repo_id} failed: {e}") from None
    return str(url)
