"""The run configuration: clear errors naming the field or line, --set overrides, no secrets on disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fake_openai_server import FakeOpenAIServer, Good, Received, Status
from orpo_distill.config import (
    RunConfig,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
    read_yaml,
    resolved_dict,
)
from orpo_distill.errors import UserError
from orpo_distill.pipeline import Run


def error_of(data: dict) -> str:
    with pytest.raises(UserError) as e:
        build_config(data, source="my.yaml")
    return str(e.value)


def test_defaults_are_valid():
    cfg = build_config({})
    assert isinstance(cfg, RunConfig) and cfg.teacher.kind == "scripted"
    assert cfg.student.model == "builtin:smollm2-135m-instruct"


def test_unknown_key_is_named_by_its_path():
    msg = error_of({"train": {"epochs": 2, "phii": 0.5}})
    assert "my.yaml" in msg and "train.phii" in msg and "unknown field" in msg
    assert "unknown field" in error_of({"trian": {}}) and "trian" in error_of({"trian": {}})


def test_wrong_type_names_field_and_value():
    msg = error_of({"train": {"epochs": "many"}})
    assert "train.epochs" in msg and "'many'" in msg
    assert "teacher.sampling.temperature" in error_of({"teacher": {"sampling": {"temperature": [1]}}})
    assert "student.kind" in error_of({"student": {"kind": "gpt"}})


@pytest.mark.parametrize("phi", [1.5, -0.1, [0.2, 1.1]])
def test_phi_outside_zero_one_is_refused(phi):
    msg = error_of({"train": {"phi": phi}})
    assert "train.phi" in msg and "between 0 and 1" in msg


def test_phi_list_and_bounds_accepted():
    assert build_config({"train": {"phi": [0.0, 0.5, 1.0]}}).train.phi == [0.0, 0.5, 1.0]
    assert build_config({"train": {"phi": 1}}).train.phi == 1


@pytest.mark.parametrize("section", ["teacher", "student"])
@pytest.mark.parametrize("k", [0, -3])
def test_non_positive_k_is_refused(section, k):
    msg = error_of({section: {"kind": "scripted", "sampling": {"samples": k}}})
    assert f"{section}.sampling.samples" in msg and "greater than or equal to 1" in msg


def test_generator_kind_needs_its_fields():
    assert "teacher.base_url: generator kind 'openai' needs 'base_url'" in error_of(
        {"teacher": {"kind": "openai", "model": "m"}})
    both = error_of({"teacher": {"kind": "openai"}})
    assert "teacher.model: generator kind 'openai' needs 'model'" in both and "needs 'base_url'" in both
    assert "teacher.path: generator kind 'replay' needs 'path'" in error_of({"teacher": {"kind": "replay"}})


def test_each_generator_kind_takes_only_its_own_fields():
    """The union on ``kind``: a field of another kind is refused, naming the kind it belongs to."""
    msg = error_of({"student": {"kind": "hf", "model": "m", "base_url": "http://127.0.0.1:9/v1"}})
    assert "student.base_url: not a field of generator kind 'hf' (it belongs to kind openai)" in msg
    msg = error_of({"teacher": {"kind": "openai", "model": "m", "base_url": "http://x/v1", "device": "cpu"}})
    assert "teacher.device: not a field of generator kind 'openai' (it belongs to kind hf or vllm)" in msg
    assert "teacher.error_rate" in error_of({"teacher": {"kind": "replay", "path": "t.jsonl", "error_rate": 0.5}})
    assert "teacher.endpont: unknown field" in error_of(
        {"teacher": {"kind": "openai", "model": "m", "base_url": "http://x/v1", "endpont": "chat"}})
    cfg = build_config({"teacher": {"kind": "openai", "model": "m", "base_url": "http://x/v1"},
                        "student": {"model": "m2"}})  # no kind: hf
    assert (type(cfg.teacher).__name__, type(cfg.student).__name__) == ("OpenAIGeneratorConfig", "HFGeneratorConfig")
    assert "device" not in resolved_dict(cfg)["teacher"] and "base_url" not in resolved_dict(cfg)["student"]


def test_a_flat_generator_section_from_an_older_config_yaml_loads():
    """Before the union every section held every kind's fields at their defaults (what an older run
    folder's config.yaml says): those are dropped; one set away from its default is still refused."""
    flat = {"model": None, "base_url": None, "api_key_env": None, "endpoint": "chat", "max_concurrency": 8,
            "timeout": 120.0, "max_retries": 6, "backoff_base": 1.0, "backoff_max": 60.0, "stop": None,
            "token_param": "max_tokens", "max_failed_share": 0.0, "path": None, "on_missing": "warn",
            "error_rate": 0.25, "dtype": "auto", "device": "auto", "trust_remote_code": False,
            "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": None}
    old = {"teacher": {**flat, "kind": "scripted", "error_rate": 0.1},
           "student": {**flat, "kind": "hf", "model": "builtin:smollm2-135m-instruct", "device": "cpu"}}
    cfg = build_config(old)
    assert cfg.teacher.error_rate == 0.1 and cfg.student.device == "cpu"
    assert resolved_dict(cfg) == resolved_dict(build_config(
        {"teacher": {"kind": "scripted", "error_rate": 0.1}, "student": {"device": "cpu"}}))
    assert "teacher.endpoint: not a field of generator kind 'scripted'" in error_of(
        {"teacher": {**flat, "kind": "scripted", "endpoint": "completions"}})


def test_a_student_that_only_samples_cannot_train():
    cfg = build_config({"student": {"kind": "replay", "path": "s.jsonl"}})
    with pytest.raises(UserError, match=r"student.kind is 'replay'.*need student.kind hf or vllm"):
        cfg.local_student
    assert build_config({}).local_student.model == "builtin:smollm2-135m-instruct"


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  epochs: 2\n  phi: [0.1, 0.2\n  lr: 1e-5\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_yaml(path)
    msg = str(e.value)
    assert str(path) in msg and "malformed YAML" in msg
    assert "line 5" in msg  # where the unclosed list runs into the next key


def test_yaml_must_be_a_mapping_and_utf8(tmp_path):
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(UserError, match="top level must be a mapping"):
        read_yaml(listy)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"task:\n  system_prompt: caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_yaml(latin)
    with pytest.raises(UserError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config(empty) == build_config({})


@pytest.mark.parametrize(
    "text, key, first, second",
    [
        ("train:\n  phi: 0.5\n  epochs: 2\n  phi: 0.25\n", "train.phi", 2, 4),
        ("run_dir: a\ntrain:\n  epochs: 1\nrun_dir: b\n", "run_dir", 1, 4),
        ("train:\n  epochs: 1\ntrain:\n  phi: 0.5\n", "train", 1, 3),  # a section given twice
        ("train:\n  lora: {r: 4, r: 8}\n", "train.lora.r", 2, 2),
        ("dataset:\n  fields:\n    question: q\n    question: text\n", "dataset.fields.question", 3, 4),
    ],
)
def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path, text, key, first, second):
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_yaml(path)
    assert str(e.value) == (f"{path}: line {second}: key {key!r} given twice (first on line {first}); YAML would "
                            "silently keep the second, so remove one")


def test_a_key_after_a_merge_overrides_it_and_is_no_duplicate(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("x-base: &base {epochs: 3, phi: 0.5}\ntrain:\n  <<: *base\n  phi: 0.25\n", encoding="utf-8")
    assert read_yaml(path)["train"] == {"epochs": 3, "phi": 0.25}
    same_value_elsewhere = tmp_path / "ok.yaml"
    same_value_elsewhere.write_text("teacher:\n  kind: scripted\nstudent:\n  kind: hf\n", encoding="utf-8")
    assert read_yaml(same_value_elsewhere) == {"teacher": {"kind": "scripted"}, "student": {"kind": "hf"}}


def test_a_folder_given_as_the_config_is_named_a_directory(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"config file {tmp_path} is a directory, not a file")):
        read_yaml(tmp_path)


@pytest.mark.parametrize("word, policy", [("off", "off"), ("on", "on"), ("Off", "off"), ("ON", "on"),
                                          ("no", "off"), ("yes", "on"), ("mixed", "mixed"), ("'off'", "off")])
def test_unquoted_policy_off_and_on_mean_what_they_say(tmp_path, word, policy):
    """YAML 1.1 reads an unquoted off/on (no/yes) as false/true; train.policy takes them as meant."""
    path = tmp_path / "p.yaml"
    path.write_text(f"train:\n  policy: {word}\n", encoding="utf-8")
    assert load_config(path).train.policy == policy
    assert load_config(None, [f"train.policy={word}"]).train.policy == policy


def test_policy_other_values_are_still_refused():
    msg = error_of({"train": {"policy": "sometimes"}})
    assert "train.policy" in msg and "'off', 'on' or 'mixed'" in msg
    assert "train.policy" in error_of({"train": {"policy": 1}})


@pytest.mark.parametrize("phi, policy", [(0, "off"), (1, "on"), (0.3, "mixed"), ([0.2, 0.6], "mixed"),
                                         ([0, 0], "off"), ({"linear": [0.1, 0.5]}, "mixed")])
def test_phi_is_the_one_setting_of_the_refresh(phi, policy):
    """train.phi alone says off (0), on (1) or mixed (between; a list; a ramp)."""
    cfg = build_config({"train": {"phi": phi}}, "test")
    assert cfg.train.policy == policy
    assert not {"policy", "phi_schedule", "phi_start"} & set(resolved_dict(cfg)["train"])


@pytest.mark.parametrize("phi", [1.5, -0.1, [], [0.2, 1.2], {"linear": [0.0, 2.0]}, {"linear": [0.5]}, {"ramp": [0, 1]}])
def test_phi_out_of_range_or_malformed_is_refused(phi):
    assert "train.phi" in error_of({"train": {"phi": phi}})


@pytest.mark.parametrize("legacy, phi", [
    ({"policy": "off", "phi": 0.7}, 0.0),
    ({"policy": "on", "phi": 0.2}, 1.0),
    ({"policy": "mixed", "phi": 0.3}, 0.3),
    ({"policy": "mixed", "phi": 0.9, "phi_schedule": "linear", "phi_start": 0.3}, {"linear": [0.3, 0.9]}),
    ({"phi_schedule": "constant", "phi_start": 0.0, "phi": [0.1, 0.4]}, [0.1, 0.4]),
])
def test_the_settings_phi_replaced_still_load_as_the_phi_they_meant(legacy, phi):
    """Older configs and comparison plans (policy, phi_schedule, phi_start) load as the same phi."""
    old = resolved_dict(build_config({"train": legacy}, "old"))
    assert old == resolved_dict(build_config({"train": {"phi": phi}}, "new"))


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.phi=0.25", ["train", "phi"], 0.25),
        ("train.epochs=3", ["train", "epochs"], 3),
        ("train.phi=[0.1, 0.5, 1]", ["train", "phi"], [0.1, 0.5, 1]),
        ("train.lora.enabled=true", ["train", "lora", "enabled"], True),
        ("teacher.base_url=http://localhost:8000/v1", ["teacher", "base_url"], "http://localhost:8000/v1"),
        ("task.system_prompt=Answer: briefly", ["task", "system_prompt"], "Answer: briefly"),
        ("task.instruction=End with #answer", ["task", "instruction"], "End with #answer"),
        ("task.instruction='quoted: yes'", ["task", "instruction"], "quoted: yes"),
        ("dataset.fields={question: q, answer: a}", ["dataset", "fields"], {"question": "q", "answer": "a"}),
        ("task.system_prompt=null", ["task", "system_prompt"], None),
        ("run_dir=", ["run_dir"], ""),
        ("run_dir = runs/a=b ", ["run_dir"], "runs/a=b"),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("bad", ["train.phi", "=3"])
def test_parse_override_needs_key_and_value(bad):
    with pytest.raises(UserError, match="--set expects key.path=value"):
        parse_override(bad)


def test_overrides_apply_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/base\ntrain:\n  epochs: 2\n  phi: 0.5\n", encoding="utf-8")
    cfg = load_config(path, ["train.phi=[0.0, 1.0]", "train.lr=1e-5", "teacher.sampling.samples=6",
                             "task.system_prompt=Be brief: one line", "run_dir=2024", "train.lambda=0.2"])
    assert cfg.train.phi == [0.0, 1.0] and cfg.train.lr == 1e-5 and cfg.train.epochs == 2
    assert cfg.teacher.sampling.samples == 6 and cfg.task.system_prompt == "Be brief: one line"
    assert cfg.run_dir == "2024" and cfg.train.lambda_or == 0.2
    with pytest.raises(UserError) as e:
        load_config(path, ["train.phi=2"])
    assert "train.phi" in str(e.value) and "--set train.phi=2" in str(e.value)
    with pytest.raises(UserError, match="'phi' is not a section"):
        apply_overrides({"train": {"phi": 0.5}}, ["train.phi.x=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config({"run_dir": str(tmp_path / "r"), "train": {"lambda": 0.3, "phi": [0.1, 0.2]}})
    Run(cfg, progress=False)
    saved = tmp_path / "r" / "config.yaml"
    assert yaml.safe_load(saved.read_text())["train"]["lambda"] == 0.3
    assert load_config(saved) == cfg


KEY = "sk-live-DO-NOT-LEAK-4242"


def test_secrets_never_reach_the_run_dir(tmp_path, monkeypatch, capsys):
    """The key is read from the named variable and sent, but no file of the run holds it, not even the
    log of a failed request whose error body echoes the Authorization header back."""
    monkeypatch.setenv("ORPO_TEST_TEACHER_KEY", KEY)

    def responder(rec: Received) -> Good:
        return Good(texts=[f"t{i}\nThe answer is (A)." for i in range(int(rec.body["n"]))])

    with FakeOpenAIServer(responder) as server:
        # the first request fails for good with a body that echoes the key, as some proxies do
        server.push(Status(400, body=f'{{"error": "invalid key Bearer {KEY}"}}'))
        cfg = build_config({
            "run_dir": str(tmp_path / "run"),
            "dataset": {"train_size": 6, "eval_size": 2},
            "teacher": {"kind": "openai", "base_url": server.base_url, "model": "teacher-x", "max_concurrency": 1,
                        "api_key_env": "ORPO_TEST_TEACHER_KEY", "max_retries": 0, "sampling": {"samples": 2},
                        "max_failed_share": 0.5},  # the one failed request must not stop the stage here
        })
        run = Run(cfg, progress=False)
        summary = run.teacher()
        assert server.received and all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.received)
    assert summary.samples == 10 and summary.failed_requests == 1

    files = [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()]
    names = {p.relative_to(cfg.run_dir).as_posix() for p in files}
    assert {"config.yaml", "teacher/traces.jsonl", "teacher/traces.failures.jsonl", "metrics.jsonl"} <= names
    assert "invalid key Bearer ***" in (Path(cfg.run_dir) / "teacher" / "traces.failures.jsonl").read_text()
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    assert "api_key_env: ORPO_TEST_TEACHER_KEY" in (Path(cfg.run_dir) / "config.yaml").read_text()
    assert KEY not in str(resolved_dict(cfg))
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err


def test_partial_generator_sections_refine_the_defaults():
    cfg = load_config(None, ["teacher.sampling.samples=8", "student.sampling.max_tokens=64"])
    assert cfg.teacher.kind == "scripted" and cfg.teacher.sampling.samples == 8
    assert cfg.student.kind == "hf" and cfg.student.model == "builtin:smollm2-135m-instruct"
    assert cfg.student.sampling.max_tokens == 64
    # naming a model or a kind still means that generator, with the usual checks
    assert build_config({"teacher": {"model": "org/big"}}).teacher.kind == "hf"
    assert "needs 'model'" in error_of({"student": {"kind": "hf"}})


def test_an_old_train_section_reads_as_the_phi_it_meant():
    """What the report applies to a config.yaml an older version wrote."""
    from orpo_distill.config import phi_policy, phi_text, upgrade_train_section

    old = {"policy": "off", "phi": 0.5, "epochs": 2}
    assert upgrade_train_section(old) == {"phi": 0.0, "epochs": 2} and old["policy"] == "off"  # a copy
    ramp = upgrade_train_section({"policy": "mixed", "phi": 0.5, "phi_schedule": "linear", "phi_start": 0.1})
    assert (phi_policy(ramp["phi"]), phi_text(ramp["phi"])) == ("mixed", "linear 0.1 to 0.5")
    assert upgrade_train_section({"phi": [0.2, 0.4]}) == {"phi": [0.2, 0.4]}
