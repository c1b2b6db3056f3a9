"""Recipe research: screens of candidate recipes over seeds (``screen``), the background campaign queue
(``campaign``), each recipe's training time as a ratio of today's (``step_time``) and the accuracy frontier
(``frontier``). Records land in ``research/results/``. May import ``tasks`` and ``bench.common``/``bench.flops``;
the pipeline never imports this package.
"""

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
