"""``python -m orpo_distill.config [docs/configuration.md]``: refresh the config reference table."""

import sys
from pathlib import Path

from .reference import update_readme

update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md"))
