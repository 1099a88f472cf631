"""The base of every config section: unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # coerce_numbers_to_str: `run_dir: 2024` or `--set student.model=1234` name a string, not a number
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
