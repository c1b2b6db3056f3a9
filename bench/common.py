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


# The CPU features that decide how fast (and, through oneDNN's kernels, how exactly) a model trains here.
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"


def cpu_description() -> dict[str, Any]:
    """Model name, family/model numbers and the flags that matter, from /proc/cpuinfo (``unknown`` elsewhere)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor is enough
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", "unknown"), "cpu_vendor": fields.get("vendor_id", "unknown"),
            "cpu_family": fields.get("cpu family"), "cpu_model_number": fields.get("model"),
            "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags]}


def machine() -> dict[str, Any]:
    import pandas
    import prefect
    import pyarrow

    return {"cpus": os.cpu_count(), **cpu_description(), "platform": platform.platform(),
            "python": platform.python_version(), "pyarrow": pyarrow.__version__, "pandas": pandas.__version__,
            "prefect": prefect.__version__, "load_average_at_start": list(os.getloadavg())}


def keep_record(kind: str, record: dict[str, Any], folder: Path = RESULTS_DIR) -> Path:
    """One file per benchmark run, meant to be committed: ``<UTC time>-<kind>.json`` with the command, the
    machine and the date inside, so a number quoted in a README can be checked against what measured it."""
    import json

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}-{kind}.json"
    path.write_text(json.dumps({"date": stamp, **record}, indent=2, default=str) + "\n")
    return path


def code_commit() -> str:
    """The commit of the checkout the benchmark runs from (empty outside git): every record names the code."""
    import subprocess

    return subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()

