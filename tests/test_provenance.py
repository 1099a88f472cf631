"""``provenance.code_version``: the package version, with the git commit where the code is a checkout's."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from orpo_distill import provenance


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_code_version_names_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    pkg = repo / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    commit = _git(repo, "rev-parse", "--short=7", "HEAD")
    version = metadata.version("orpo-distill")
    assert provenance.describe_code(pkg) == f"{version}+g{commit}"
    (pkg / "new.py").write_text("")  # untracked: not a change to the code that ran
    assert provenance.describe_code(pkg) == f"{version}+g{commit}"
    (pkg / "__init__.py").write_text("x = 2\n")
    assert provenance.describe_code(pkg) == f"{version}+g{commit}.dirty"
    # a copy of the package that git does not track (a venv inside the checkout, say): the version only
    ignored = repo / ".venv" / "pkg"
    ignored.mkdir(parents=True)
    (ignored / "__init__.py").write_text("")
    (repo / ".gitignore").write_text(".venv/\n")
    assert provenance.describe_code(ignored) == version
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.describe_code(outside) == version


def test_code_version_of_this_package(monkeypatch: pytest.MonkeyPatch) -> None:
    here = Path(provenance.__file__).resolve().parent
    assert provenance.code_version() == provenance.describe_code(here)
    monkeypatch.setenv("PATH", "")  # no git at all: the version alone
    assert provenance.describe_code(here) == metadata.version("orpo-distill")
