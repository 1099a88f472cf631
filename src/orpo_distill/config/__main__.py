"""``python -m orpo_distill.config [README.md]``: refresh the config reference table in the README."""

import sys
from pathlib import Path

from .reference import update_readme

update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
