"""What every benchmark shares: the run modes, timing helpers, the log and the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    repeats: int  # timed repetitions of each side, interleaved; the fastest of each side is kept
    slow_repeats: int  # the same for validation and training, which take longer
    epochs: int
    train_rows: int | None  # None: the whole train split
    recipe_steps: int  # steps per epoch of the short recipe fits (2 epochs) that measure FLOPs utilization


FULL = Mode(repeats=3, slow_repeats=1, epochs=3, train_rows=None, recipe_steps=100)
QUICK = Mode(repeats=1, slow_repeats=1, epochs=1, train_rows=10_000, recipe_steps=10)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleaved_best(sides: dict[str, Callable[[], Any]], repeats: int,
                     cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Run each side ``repeats`` times, alternating, and keep each side's fastest time (least disturbed).

    ``cpu``, if given, receives each side's CPU seconds (all threads) of that fastest run.
    """
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            cpu_start = time.process_time()
            seconds = timed(fn)[0]
            if seconds < best[name]:
                best[name] = seconds
                if cpu is not None:
                    cpu[name] = time.process_time() - cpu_start
    return best


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import pandas
    import prefect
    import pyarrow

    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "pyarrow": pyarrow.__version__, "pandas": pandas.__version__,
            "prefect": prefect.__version__, "load_average_at_start": list(os.getloadavg())}
