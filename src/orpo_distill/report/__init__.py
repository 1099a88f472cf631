"""``orpo-distill report``: report.md, a self-contained report.html and plots/*.png.

The argument is either a run folder (``config.yaml`` and ``metrics.jsonl``) or a comparison folder
(``comparison.json``, written by ``orpo-distill compare``). Both reports are built the same way: the
data is gathered from the files on disk into plain values (:mod:`.gather`), the plots are drawn from
those values (``plots.py``), and the text is a list of blocks (:mod:`.blocks`, :mod:`.tables`) rendered
twice, as Markdown (images linked) and as HTML (images embedded as base64). :mod:`.pages` puts the two
reports together. See docs/architecture.md.
"""

from .blocks import Block, Heading, Image, Para, Table, render_html, render_markdown
from .blocks import fmt_count  # noqa: F401  (read by tests)
from ..text_similarity import mean_pairwise_similarity, words
from .gather import distinct_n, refresh_counts, teacher_diversity, training_rows, training_series
from .pages import comparison_report, detect, run_report, write_report
from .tables import refresh_table  # noqa: F401  (read by tests)
from .tables import comparison_blocks, verdict

__all__ = [
    "Block", "Heading", "Image", "Para", "Table", "comparison_blocks", "comparison_report", "detect", "distinct_n",
    "mean_pairwise_similarity", "refresh_counts", "render_html", "render_markdown", "run_report",
    "teacher_diversity", "training_rows", "training_series", "verdict", "words", "write_report",
]
