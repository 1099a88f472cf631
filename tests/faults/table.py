"""``python tests/faults/table.py``: rewrite the bad-input table of docs/reliability.md from the test's CASES.

Only the block between ``<!-- bad-inputs:start -->`` and ``<!-- bad-inputs:end -->`` is replaced; the rest
of the file (other sections, other authors') is left as it is. tests/faults/test_doc.py fails when the
table and CASES differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, fake_openai_server, faults

from faults.test_bad_inputs import DOC, update_doc  # noqa: E402

if __name__ == "__main__":
    update_doc(Path(sys.argv[1]) if len(sys.argv) > 1 else DOC)
    print(f"updated {DOC}")
