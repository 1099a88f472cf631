"""The docs stay true: the README's config reference and the shipped configs match the code."""

from pathlib import Path

import pytest

from orpo_distill.config import config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    readme = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == config_reference(), (
        "docs/configuration.md's config reference is stale: regenerate it with "
        "`python -m orpo_distill.config` (see config.py)"
    )


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.run_dir
