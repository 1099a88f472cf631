"""``orpo-distill compare``: the paper's variants and seeds, each its own run, in one table.

A comparison folder (the config's ``run_dir`` unless ``--out`` names another; its paths are
:class:`~orpo_distill.layout.CompareLayout`'s) holds ``plan.json``, one shared run per seed
(``shared/seed_S``: teacher traces, initial student samples, base evaluation), one ordinary run folder
per variant and seed (``VARIANT/seed_S``), and comparison.json/.md, the report and its plots.

- :mod:`.variants`: variant names -> config overrides, and each run's configuration
- :mod:`.plan`: ``plan.json``, and whether a run is finished
- :mod:`.run`: the shared runs, the variants' runs, the whole comparison
- :mod:`.statistics`: bootstrap intervals and paired differences (pure)
- :mod:`.aggregate`: the run folders -> comparison.json and comparison.md
- :mod:`.archive`: the folder without weights or unfinished runs (`--archive`), to keep or carry

See docs/architecture.md.
"""

from .aggregate import aggregate, run_timing, training_data, write_comparison
from .plan import Plan, final_eval_key, is_finished, load_plan, open_plan
from .run import copy_atomic, prepare_shared, run_comparison, run_variant, seed_from_shared, table_variants, tabulate
from .statistics import bootstrap_mean, paired_difference, paired_rows, summarise
from .variants import (
    BASELINE,
    DEFAULT_VARIANTS,
    MODIFIERS,
    QUICK_SEEDS,
    QUICK_SIZES,
    VARIANTS,
    comparison_pairs,
    parse_variants,
    quick_config,
    run_dir,
    shared_config,
    shared_dir,
    variant_config,
    variant_overrides,
)

__all__ = [
    "BASELINE", "DEFAULT_VARIANTS", "MODIFIERS", "QUICK_SEEDS", "QUICK_SIZES", "VARIANTS", "Plan", "aggregate",
    "bootstrap_mean", "comparison_pairs", "copy_atomic", "final_eval_key", "is_finished", "load_plan", "open_plan",
    "paired_difference", "paired_rows", "parse_variants", "prepare_shared", "quick_config", "run_comparison",
    "run_dir", "run_timing", "run_variant", "seed_from_shared", "shared_config", "shared_dir", "summarise",
    "table_variants", "tabulate", "training_data", "variant_config", "variant_overrides", "write_comparison",
]
