"""Bad inputs through the real command line: each row is one mistake a user makes, the command that meets
it, and the message the user must see (exit code 2, no traceback): one line, or for a config with wrong
fields one line followed by one indented line per field.

Rows run in-process through ``orpo_distill.cli.main`` (what the console script calls); the rows marked
``real`` also run as a separate process, to prove that nothing but the message reaches the terminal.
The table in docs/reliability.md is generated from ``CASES`` (``python tests/faults/table.py``) and a
test below keeps the two in sync.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import set_dotted, tiny_config_dict
from orpo_distill import cli

from .common import REPO, check_store, child_env, error_message, no_traceback, orpo_distill_command, write_yaml

DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"
MARKER = "pwned.txt"  # what hostile content would create if it were ever executed
SECRET = "sk-faults-SECRET-4e1f"  # an API key value: no message may echo it


@dataclass
class Ctx:
    """What a row's setup may use: a scratch folder and the tiny test model."""

    tmp: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch | None = None

    def data(self, **dotted: Any) -> dict[str, Any]:
        d = tiny_config_dict(self.tmp / "run", self.model)
        for key, value in dotted.items():
            set_dotted(d, key, value)
        return d

    def config(self, name: str = "run.yaml", data: dict[str, Any] | None = None, **dotted: Any) -> str:
        return str(write_yaml(data if data is not None else self.data(**dotted), self.tmp / name))

    def file(self, name: str, content: str | bytes) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return str(p)

    def jsonl(self, name: str, rows: list[Any]) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def dataset(self, rows: list[Any], name: str = "data.jsonl", **dotted: Any) -> str:
        """A run config over a jsonl dataset of ``rows`` (mcq), teacher replayed from a file."""
        path = self.jsonl(name, rows)
        replay = self.jsonl("replay.jsonl", [{"id": r.get("id") if isinstance(r, dict) else None,
                                              "text": "The answer is (A)."} for r in rows])
        return self.config(**{"dataset": {"kind": "jsonl", "path": path}, "teacher": {"kind": "replay", "path": replay},
                              **dotted})

    def model_copy(self, name: str, drop: tuple[str, ...] = (), edit: Callable[[dict], None] | None = None) -> str:
        """A copy of the tiny model without the files in ``drop``, its tokenizer config edited by ``edit``."""
        import shutil

        out = self.tmp / name
        shutil.copytree(self.model, out)
        for f in drop:
            (out / f).unlink()
        if edit is not None:
            cfg_path = out / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            edit(cfg)
            cfg_path.write_text(json.dumps(cfg))
        return str(out)


MCQ = [{"id": f"q{i}", "question": f"Question {i}?", "choices": ["yes", "no", "maybe"], "answer": "A"} for i in range(4)]


@dataclass
class Case:
    id: str
    what: str  # the mistake, as the doc states it
    command: str  # the orpo-distill subcommand that meets it
    args: Callable[[Ctx], list[str]]  # its arguments (the setup writes the files they name)
    expect: str  # a stable, specific fragment of the error line; {tmp} is the scratch folder
    real: bool = False  # also run it as a separate process

    def argv(self, ctx: Ctx) -> list[str]:
        extra = [] if self.command == "report" else ["--no-progress"]
        return [self.command, *self.args(ctx), *extra]


def _store_other_settings(c: Ctx) -> list[str]:
    assert cli.main(["teacher", c.config(), "--no-progress"]) == 0
    return [c.config(**{"teacher.sampling.temperature": 0.3})]


def _store_corrupt_line(c: Ctx) -> list[str]:
    path = c.config()
    assert cli.main(["teacher", path, "--no-progress"]) == 0
    store = c.tmp / "run" / "teacher" / "traces.jsonl"
    lines = store.read_bytes().split(b"\n")
    lines[4] = lines[4][:20]  # a line in the middle cut short: not a torn tail, a damaged file
    store.write_bytes(b"\n".join(lines))
    return [path]


def _custom_without_permission(c: Ctx) -> list[str]:
    mod = c.file("evil_task.py", f"open({str(c.tmp / MARKER)!r}, 'w').write('ran')\n"
                                 "def extract(text, record):\n    return text\n")
    return [c.config(**{"task": {"kind": "custom", "custom": f"{mod}:extract"}})]


def _long_prompt(c: Ctx) -> list[str]:
    question = "How many? " + "word " * 3000  # past the tiny model's 1024-token context
    rows = [{"id": "long", "question": question, "answer": "A", "choices": ["1", "2"]}, *MCQ]
    path = c.jsonl("long.jsonl", rows)
    return [c.config(**{"dataset": {"kind": "jsonl", "path": path, "eval_path": c.jsonl("ev.jsonl", [
        {**MCQ[0], "id": "e0"}])}, "student.sampling.samples": 1})]


def remote_code_model(c: Ctx, name: str = "remote") -> str:
    """A model folder whose config.json sends transformers to Python code in the folder (auto_map), code
    that leaves MARKER behind when it runs."""
    folder = Path(c.model_copy(name))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evilllama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(
        f"open({str(c.tmp / MARKER)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return str(folder)


def _with_env(c: Ctx, name: str, value: str, **dotted: Any) -> list[str]:
    assert c.monkeypatch is not None
    c.monkeypatch.setenv(name, value)
    return [c.config(**dotted)]


def _replay(c: Ctx, name: str, content: str | bytes | list[Any]) -> list[str]:
    path = c.jsonl(name, content) if isinstance(content, list) else c.file(name, content)
    return [c.config(teacher={"kind": "replay", "path": path})]


def _model(c: Ctx, **kw: Any) -> list[str]:
    return [c.config(**{"student.model": c.model_copy("m", **kw)})]


def _jsonl_dataset(c: Ctx, content: str | bytes, name: str = "d.jsonl") -> list[str]:
    return [c.config(dataset={"kind": "jsonl", "path": c.file(name, content)})]


def _dataset_folder(c: Ctx) -> list[str]:
    (c.tmp / "medqa").mkdir()
    return [c.config(dataset={"kind": "jsonl", "path": str(c.tmp / "medqa")})]


def _set(**dotted: Any) -> Callable[[Ctx], list[str]]:
    return lambda c: [c.config(**dotted)]


CASES: list[Case] = [
    # ---- the config file and the command line
    Case("yaml-malformed", "config: malformed YAML (an unclosed list)", "teacher",
         lambda c: [c.file("bad.yaml", "train:\n  phi: [0.5\n")],
         "{tmp}/bad.yaml: line 3, column 1: malformed YAML: expected ',' or ']', but got '<stream end>'", real=True),
    Case("yaml-not-a-mapping", "config: a YAML list instead of sections", "teacher",
         lambda c: [c.file("list.yaml", "- teacher\n- student\n")],
         "{tmp}/list.yaml: the top level must be a mapping of sections, got list"),
    Case("yaml-not-utf8", "config: bytes that are not UTF-8", "teacher",
         lambda c: [c.file("latin1.yaml", b"run_dir: caf\xe9\n")],
         "{tmp}/latin1.yaml: not UTF-8 text (invalid continuation byte at byte 12)"),
    Case("yaml-missing", "config: the file does not exist", "teacher",
         lambda c: [str(c.tmp / "nope.yaml")], "config file not found: {tmp}/nope.yaml"),
    Case("yaml-is-a-directory", "config: a folder instead of the file", "teacher",
         lambda c: [str(c.tmp)], "config file {tmp} is a directory, not a file"),
    Case("yaml-duplicate-key", "config: a key given twice (YAML alone keeps the second silently)", "teacher",
         lambda c: [c.file("dup.yaml", "train:\n  phi: 0.5\n  epochs: 2\n  phi: 0.25\n")],
         "{tmp}/dup.yaml: line 4: key 'train.phi' given twice (first on line 2); YAML would silently keep the "
         "second, so remove one", real=True),
    Case("yaml-python-tag", "config: a YAML tag that would run code (!!python/object/apply)", "teacher",
         lambda c: [c.file("tag.yaml", f"run_dir: !!python/object/apply:os.system ['touch {c.tmp / MARKER}']\n")],
         "{tmp}/tag.yaml: line 1, column 10: malformed YAML: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'"),
    Case("unknown-key", "config: a misspelt field (train.phii)", "teacher",
         _set(**{"train.phii": 0.5}), "train.phii: unknown field (check the spelling"),
    Case("unknown-section", "config: a misspelt section (teachr)", "teacher",
         _set(**{"teachr.kind": "hf"}), "teachr: unknown field (check the spelling"),
    Case("wrong-type", "config: a word where a number goes (train.epochs: two)", "teacher",
         _set(**{"train.epochs": "two"}),
         "train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    Case("section-not-mapping", "config: a number where a section goes (train: 5)", "teacher",
         _set(train=5), "train: Input should be a valid dictionary or instance of TrainConfig (got 5)"),
    Case("phi-negative", "config: phi below 0", "teacher",
         _set(**{"train.phi": -0.1}), "train.phi: Value error, phi must be between 0 and 1, got -0.1"),
    Case("phi-above-one", "config: phi above 1", "teacher",
         _set(**{"train.phi": 1.5}), "train.phi: Value error, phi must be between 0 and 1, got 1.5"),
    Case("phi-list-out-of-range", "config: a phi list with a value above 1", "teacher",
         _set(**{"train.phi": [0.5, 2]}), "train.phi: Value error, phi must be between 0 and 1, got 2"),
    Case("phi-list-too-short", "config: a phi list shorter than the refreshes it must cover", "train",
         _set(**{"train.phi": [0.5], "train.epochs": 3, "dataset.train_size": 2}), "train.phi lists 1 values, but epoch 3 needs value 2"),
    Case("teacher-k-zero", "config: K = 0 teacher samples", "teacher",
         _set(**{"teacher.sampling.samples": 0}),
         "teacher.sampling.samples: Input should be greater than or equal to 1 (got 0)"),
    Case("student-k-zero", "config: K = 0 student samples", "teacher",
         _set(**{"student.sampling.samples": 0}),
         "student.sampling.samples: Input should be greater than or equal to 1 (got 0)"),
    Case("lr-negative", "config: a negative learning rate", "teacher",
         _set(**{"train.lr": -1e-5}), "train.lr: Input should be greater than 0 (got -1e-05)"),
    Case("epochs-zero", "config: epochs 0", "teacher",
         _set(**{"train.epochs": 0}), "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    Case("lambda-negative", "config: a negative ORPO lambda", "teacher",
         _set(**{"train.lambda": -0.1}), "train.lambda: Input should be greater than or equal to 0 (got -0.1)"),
    Case("temperature-negative", "config: a negative sampling temperature", "teacher",
         _set(**{"teacher.sampling.temperature": -1}),
         "teacher.sampling.temperature: Input should be greater than or equal to 0 (got -1)"),
    Case("eval-fraction-one", "config: eval_fraction 1 (nothing left to train on)", "teacher",
         _set(**{"dataset.eval_fraction": 1.0}), "dataset.eval_fraction: Input should be less than 1 (got 1.0)"),
    Case("set-without-equals", "command line: --set without '='", "teacher",
         lambda c: [c.config(), "--set", "train.phi"], "--set expects key.path=value, got 'train.phi'"),
    Case("set-into-a-value", "command line: --set below a field that is not a section", "teacher",
         lambda c: [c.config(), "--set", "run_dir.x=1"], "--set run_dir.x=1: 'run_dir' is not a section"),
    Case("set-wrong-type", "command line: --set train.epochs=two", "teacher",
         lambda c: [c.config(), "--set", "train.epochs=two"],
         "train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    Case("device-unknown", "config: a device name that is no device", "student",
         _set(**{"student.device": "gpu0"}), "device 'gpu0' is not a device name (auto, cpu, cuda, cuda:1, ...)"),
    # ---- generators
    Case("openai-no-base-url", "teacher: openai without base_url", "teacher",
         _set(teacher={"kind": "openai", "model": "m"}),
         "teacher.base_url: generator kind 'openai' needs 'base_url' (server base URL(s) ending in /v1"),
    Case("base-url-not-a-url", "teacher: a base_url that is not a URL", "teacher",
         _set(teacher={"kind": "openai", "model": "m", "base_url": "localhost:8000/v1"}),
         "teacher.base_url: 'localhost:8000/v1' is not an http:// or https:// URL", real=True),
    Case("api-key-env-unset", "teacher: api_key_env names a variable that is not set", "teacher",
         _set(teacher={"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                       "api_key_env": "ORPO_FAULTS_UNSET_KEY"}),
         "teacher.api_key_env: the environment variable ORPO_FAULTS_UNSET_KEY is not set or empty"),
    Case("api-key-unsendable", "teacher: an API key with a control character (the key is never echoed)", "teacher",
         lambda c: _with_env(c, "ORPO_FAULTS_BAD_KEY", SECRET + "\x07",
                             teacher={"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                                      "api_key_env": "ORPO_FAULTS_BAD_KEY"}),
         "teacher.api_key_env: the value of ORPO_FAULTS_BAD_KEY has characters an HTTP header cannot carry"),
    Case("replay-missing", "teacher: a replay file that does not exist", "teacher",
         lambda c: [c.config(teacher={"kind": "replay", "path": str(c.tmp / "none.jsonl")})],
         "teacher.path: replay file not found: {tmp}/none.jsonl"),
    Case("replay-malformed", "teacher: a replay file with a line that is not JSON", "teacher",
         lambda c: _replay(c, "rp.jsonl", '{"id": "syn-000000", "text": "The answer is (A)."}\n{"id": "syn-000001", "text": \n'),
         "{tmp}/rp.jsonl:2: malformed JSON: Expecting value (column 30)"),
    Case("replay-no-id", "teacher: a replay line without an id", "teacher",
         lambda c: _replay(c, "rp.jsonl", [{"text": "x"}]),
         "{tmp}/rp.jsonl:1: no question id (expected one of the fields id, question_id)"),
    Case("replay-pickle", "teacher: a replay file holding pickle bytes (never unpickled)", "teacher",
         lambda c: _replay(c, "rp.pkl", b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."),
         "{tmp}/rp.pkl:1: not UTF-8 text (invalid start byte at byte 1 of the line)"),
    Case("replay-yaml-tag", "teacher: a replay line that is a YAML python tag (never evaluated)", "teacher",
         lambda c: _replay(c, "rp.jsonl", f"!!python/object/apply:os.system ['touch {c.tmp / MARKER}']\n"),
         "{tmp}/rp.jsonl:1: malformed JSON: Expecting value (column 1)"),
    Case("replay-is-a-directory", "teacher: a folder given as the replay file", "teacher",
         lambda c: [c.config(teacher={"kind": "replay", "path": str(c.tmp)})],
         "teacher.path: replay file {tmp} is a directory, not a file"),
    Case("replay-fewer-than-samples", "teacher: a replay file with 1 trace per question where "
         "teacher.sampling.samples asks for 4, with teacher.on_missing: error", "teacher",
         lambda c: [c.dataset(MCQ, **{"teacher.on_missing": "error"})],
         "teacher.on_missing is error: {tmp}/replay.jsonl holds fewer than the 4 traces per question that "
         "sampling.samples asks for, for 3 of the 3 questions (9 samples missing; "),
    Case("replay-wrong-ids", "teacher: a replay file whose ids match no training question", "teacher",
         lambda c: _replay(c, "rp.jsonl", [{"id": f"other-{i}", "text": "The answer is (A)."} for i in range(3)]),
         "{tmp}/rp.jsonl holds traces for none of the 12 training questions"),
    # ---- datasets
    Case("dataset-missing", "dataset: the file does not exist", "teacher",
         lambda c: [c.config(dataset={"kind": "jsonl", "path": str(c.tmp / "none.jsonl")})],
         "dataset file not found: {tmp}/none.jsonl"),
    Case("dataset-is-a-directory", "dataset: a folder given as the dataset file", "teacher",
         _dataset_folder, "dataset file {tmp}/medqa is a directory, not a file; name a .jsonl file in it"),
    Case("dataset-empty", "dataset: an empty file", "teacher",
         lambda c: _jsonl_dataset(c, ""), "the dataset has no training questions (check dataset.path, fields and train_size)"),
    Case("dataset-malformed", "dataset: a line that is not JSON", "teacher",
         lambda c: _jsonl_dataset(c, json.dumps(MCQ[0]) + '\n{"id": "q9", \n'),
         "{tmp}/d.jsonl:2: malformed JSON: Expecting property name enclosed in double quotes (column 14)"),
    Case("dataset-not-utf8", "dataset: bytes that are not UTF-8", "teacher",
         lambda c: _jsonl_dataset(c, b'{"id": "q1", "question": "caf\xe9?", "answer": "A", "choices": ["a", "b"]}\n'),
         "{tmp}/d.jsonl:1: not UTF-8 text (invalid continuation byte at byte 30 of the line)", real=True),
    Case("dataset-not-an-object", "dataset: a line that is a JSON list", "teacher",
         lambda c: _jsonl_dataset(c, '["q1", "A"]\n'), "{tmp}/d.jsonl:1: expected a JSON object, got list"),
    Case("dataset-duplicate-ids", "dataset: two rows with the same id", "teacher",
         lambda c: [c.dataset([MCQ[0], MCQ[1], {**MCQ[2], "id": "q0"}])],
         "{tmp}/data.jsonl:3: duplicate id 'q0', first seen at {tmp}/data.jsonl:1"),
    Case("dataset-missing-answer", "dataset: a row without an answer", "teacher",
         lambda c: [c.dataset([MCQ[0], {k: v for k, v in MCQ[1].items() if k != "answer"}])],
         "{tmp}/data.jsonl:2: missing answer (field 'answer')"),
    Case("dataset-missing-question", "dataset: a row with a blank question", "teacher",
         lambda c: [c.dataset([{**MCQ[0], "question": "  "}])], "{tmp}/data.jsonl:1: missing question (field 'question')"),
    Case("dataset-answer-not-a-choice", "dataset: an mcq answer that is none of the choices", "teacher",
         lambda c: [c.dataset([{**MCQ[0], "answer": "Paris"}])],
         "{tmp}/data.jsonl:1: answer 'Paris' is neither a letter A-C nor the text of one of the 3 choices"),
    Case("dataset-choices-not-a-list", "dataset: choices that are a number", "teacher",
         lambda c: [c.dataset([{**MCQ[0], "choices": 4}])],
         "{tmp}/data.jsonl:1: choices must be a list of strings or a {label, text} mapping"),
    Case("dataset-10mb-garbage-line", "dataset: a 10 MB line that is not JSON", "teacher",
         lambda c: _jsonl_dataset(c, json.dumps(MCQ[0]) + "\n" + "x" * 10_000_000 + "\n"),
         "{tmp}/d.jsonl:2: malformed JSON: Expecting value (column 1)"),
    Case("dataset-fields-unknown", "dataset: a field map with a name we do not know", "teacher",
         lambda c: [c.dataset(MCQ, **{"dataset.fields": {"quest": "q"}})],
         "dataset.fields: unknown name(s) ['quest']; the names are id, question, answer, choices"),
    Case("dataset-same-file-twice", "dataset: the same file as training and evaluation data", "teacher",
         lambda c: [c.dataset(MCQ, **{"dataset.eval_path": str(c.tmp / "data.jsonl")})],
         "dataset: id 'q0' appears in both the training and the evaluation data (training: {tmp}/data.jsonl:1; "
         "evaluation: {tmp}/data.jsonl:1)"),
    Case("dataset-jsonl-no-path", "dataset: kind jsonl without a path", "teacher",
         _set(dataset={"kind": "jsonl"}), "dataset.path: the jsonl dataset needs a file (dataset.path or dataset.train_path)"),
    Case("gsm8k-with-mcq", "dataset: gsm8k with an mcq task", "teacher",
         _set(dataset={"kind": "gsm8k"}), "dataset.kind 'gsm8k' has numeric answers; set task.kind: numeric (got 'mcq')"),
    Case("gsm8k-no-final-line", "dataset: a GSM8K row whose answer has no '#### N' line", "teacher",
         lambda c: [c.config(dataset={"kind": "gsm8k", "path": c.jsonl("g.jsonl", [{"question": "2+2?", "answer": "It is 4."}])},
                             task={"kind": "numeric"})],
         "{tmp}/g.jsonl:1: the answer has no '#### N' final line"),
    Case("numeric-gold-not-a-number", "dataset: a numeric task whose gold answer holds no number", "teacher",
         lambda c: [c.dataset([{"id": "n1", "question": "How many?", "answer": "several"},
                               {"id": "n2", "question": "How many more?", "answer": "3"}], task={"kind": "numeric"})],
         "record n1: numeric answer 'several' holds no number"),
    # ---- tasks and custom code
    Case("custom-no-name", "task: kind custom without task.custom", "teacher",
         _set(task={"kind": "custom"}), "task: Value error, task.kind 'custom' needs task.custom: 'module:function'"),
    Case("custom-not-allowed", "task: custom code without allow_custom_code (the module must not run)", "teacher",
         _custom_without_permission,
         "task.custom '{tmp}/evil_task.py:extract' runs your own Python code; set task.allow_custom_code: true to allow it"),
    Case("custom-module-missing", "task: a custom module that cannot be imported", "teacher",
         _set(task={"kind": "custom", "custom": "no_such_module_xyz:f", "allow_custom_code": True}),
         "task.custom: cannot import module 'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    Case("custom-on-builtin-kind", "task: task.custom set while task.kind is mcq", "teacher",
         _set(task={"kind": "mcq", "custom": "m:f"}),
         "task.custom is set ('m:f') but task.kind is 'mcq'; set task.kind: custom to use it"),
    # ---- models and tokenizers
    Case("model-missing", "student: a model path that does not exist", "student",
         lambda c: [c.config(**{"student.model": str(c.tmp / "no-model")})],
         "model path does not exist: {tmp}/no-model", real=True),
    Case("model-no-config", "student: a model folder without config.json", "student",
         lambda c: _model(c, drop=("config.json",)), "model folder {tmp}/m has no config.json (not a transformers checkpoint)"),
    Case("model-no-weights", "student: a model folder without weights", "student",
         lambda c: _model(c, drop=("model.safetensors",)), "could not load model '{tmp}/m': "),
    Case("tokenizer-no-pad-no-eos", "student: a tokenizer with neither a pad nor an eos token", "student",
         lambda c: _model(c, edit=lambda t: [t.pop("eos_token"), t.pop("pad_token")]),
         "tokenizer of '{tmp}/m' has neither a pad nor an eos token; cannot batch"),
    Case("model-needs-remote-code", "student: a model that needs its own Python code, trust_remote_code unset "
         "(the code must not run)", "student", lambda c: [c.config(**{"student.model": remote_code_model(c)})],
         "model '{tmp}/remote' needs Python code from its own files (auto_map in its config.json), which is not run "
         "unless you allow it: set trust_remote_code: true"),
    Case("prompt-past-context", "student: a question longer than the model's context", "student",
         _long_prompt, "question 'long': the prompt is 3072 tokens and max_tokens 24, more than the 1024-token "
                       "context of hf:{model}; shorten or drop that question (or lower max_tokens)"),
    # ---- the run directory and its state
    Case("run-dir-is-a-file", "run_dir names a file", "teacher",
         lambda c: [c.config(run_dir=c.file("taken", "not a folder"))],
         "run_dir {tmp}/taken exists and is not a directory", real=True),
    Case("run-dir-below-a-file", "run_dir below a file", "teacher",
         lambda c: [c.config(run_dir=c.file("taken", "x") + "/run")], "run_dir {tmp}/taken/run: {tmp}/taken is a file"),
    Case("run-subfolder-is-a-file", "a file where the run's teacher/ folder goes", "teacher",
         lambda c: [c.file("run/teacher", "x") and c.config()],
         "cannot access {tmp}/run/teacher: File exists [EEXIST]; the run directory must be a folder you can write to"),
    Case("store-other-settings", "rerun with other sampling settings into the same run_dir", "teacher",
         _store_other_settings, "{tmp}/run/teacher/traces.jsonl was generated with other settings"),
    Case("store-corrupt-line", "a store damaged in the middle (not a torn tail)", "teacher",
         _store_corrupt_line, "{tmp}/run/teacher/traces.jsonl:5: malformed JSON: Expecting property name enclosed in double quotes (column 21)"),
    Case("eval-no-checkpoint", "eval of an epoch that has no checkpoint", "eval",
         lambda c: [c.config(), "--epoch", "3"],
         "no complete checkpoint for epoch 3 in {tmp}/run/checkpoints; run `orpo-distill train` first"),
    Case("nothing-to-train-on", "a teacher that is always wrong (no positive for any question)", "train",
         _set(**{"teacher.error_rate": 1.0, "dataset.train_size": 4}),
         "epoch 1 has nothing to train on: 4 questions have no correct teacher trace"),
    Case("report-not-a-run", "report on a folder that is not a run", "report",
         lambda c: [str(c.tmp)], "{tmp} is neither a run directory (config.yaml and metrics.jsonl)"),
    Case("compare-zero-seeds", "compare with --seeds 0", "compare",
         lambda c: [c.config(), "--seeds", "0"], "--seeds must be at least 1, got 0"),
    Case("compare-unknown-variant", "compare with a variant that does not exist", "compare",
         lambda c: [c.config(), "--variants", "orpo-best"], "unknown variant 'orpo-best'"),
]


def _ids() -> list[str]:
    return [c.id for c in CASES]


def _expected(case: Case, ctx: Ctx) -> str:
    return case.expect.replace("{tmp}", str(ctx.tmp)).replace("{model}", str(ctx.model))


@pytest.fixture
def ctx(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    monkeypatch.delenv("ORPO_FAULTS_UNSET_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return Ctx(tmp_path, tiny_model_dir, monkeypatch)


def test_case_ids_are_unique_and_there_are_at_least_30() -> None:
    assert len(set(_ids())) == len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_bad_input_gives_one_clear_line_and_exit_2(case: Case, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    argv = case.argv(ctx)
    capsys.readouterr()  # what a setup step printed
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    no_traceback(out + err)
    message = error_message(err)
    assert rc == 2, err
    assert _expected(case, ctx) in message, f"\nexpected: {_expected(case, ctx)}\n     got: {message}"
    assert len(message) < 600, "the message must not echo the bad input at length"
    assert not (ctx.tmp / MARKER).exists(), "hostile content was executed"
    assert SECRET not in out + err


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.real], ids=[c.id for c in CASES if c.real])
def test_bad_input_in_a_real_process_prints_only_the_message(case: Case, ctx: Ctx) -> None:
    argv = case.argv(ctx)
    proc = subprocess.run([*orpo_distill_command(), *argv], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=ctx.tmp)
    assert proc.returncode == 2, proc.stderr
    no_traceback(proc.stdout + proc.stderr)
    assert proc.stderr.rstrip().endswith(error_message(proc.stderr)), "only the message, last"
    assert _expected(case, ctx) in proc.stderr


# ---- inputs that look wrong but are handled ------------------------------------------------------------


def test_tokenizer_without_chat_template_or_pad_token_is_served_plain(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    """No chat template: prompts are rendered as plain text; no pad token: the eos token pads."""
    model = ctx.model_copy("plain", drop=("chat_template.jinja",), edit=lambda t: t.pop("pad_token"))
    cfg = ctx.config(**{"student.model": model, "dataset.train_size": 2, "student.sampling.samples": 1})
    assert cli.main(["student", cfg, "--no-progress"]) == 0
    assert "2 (2)" in capsys.readouterr().out


def test_dataset_with_byte_order_mark_and_crlf_loads(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    text = "\ufeff" + "".join(json.dumps(r) + "\r\n" for r in MCQ)
    path = ctx.file("bom.jsonl", text.encode("utf-8"))
    replay = ctx.jsonl("replay.jsonl", [{"id": r["id"], "text": "The answer is (A)."} for r in MCQ])
    cfg = ctx.config(dataset={"kind": "jsonl", "path": path}, teacher={"kind": "replay", "path": replay,
                                                                       "sampling": {"samples": 1}})
    assert cli.main(["teacher", cfg, "--no-progress"]) == 0
    rows = check_store(ctx.tmp / "run" / "teacher" / "traces.jsonl")
    assert len(rows) == 3 and {r["id"] for r in rows} < {r["id"] for r in MCQ}  # 4 rows, one held out
    assert all(r["correct"] for r in rows)


# ---- the table in docs/reliability.md ------------------------------------------------------------------


def markdown_table() -> str:
    """The doc's table of bad inputs, generated from CASES."""
    lines = ["| # | bad input | command | what the user sees (exit 2, no traceback) | test id |",
             "| --- | --- | --- | --- | --- |"]
    for i, c in enumerate(CASES, 1):
        msg = c.expect.replace("{tmp}", "TMP").replace("{model}", "MODEL").replace("|", "\\|")
        real = " (and as a real process)" if c.real else ""
        lines.append(f"| {i} | {c.what} | `{c.command}` | `orpo-distill: error: ...{msg}...` | `{c.id}`{real} |")
    return "\n".join(lines) + "\n"


def update_doc(path: Path = DOC) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + markdown_table() + text[end:], encoding="utf-8")


def test_the_doc_lists_every_case() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOC} lacks the generated table; run python tests/faults/table.py"
    block = text[text.index(BEGIN) + len(BEGIN): text.index(END)]
    assert block.strip() == markdown_table().strip(), "docs/reliability.md is stale: run python tests/faults/table.py"
