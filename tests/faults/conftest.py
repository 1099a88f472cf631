"""Fixtures of the fault tests, and the key-loss and duplicate tally printed at the end of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from .common import TALLY, TrainReference


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TrainReference]:
    """The small training run without any fault, started in the background at first use: the runs that
    were killed, fed a NaN or ran out of disk must end with its weights once rerun."""
    ref = TrainReference(tmp_path_factory.mktemp("train-reference"), tiny_model_dir)
    yield ref
    ref.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY["stores"]:
        terminalreporter.write_line(
            f"fault tests: {TALLY['stores']} stores checked, {TALLY['keys']} keys, "
            f"{TALLY['lost']} lost, {TALLY['duplicates']} duplicates")
