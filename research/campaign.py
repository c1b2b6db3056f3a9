"""The accuracy campaign's background queue: screen runs one at a time, each recorded and committed as it ends.

    nohup python research/campaign.py --commit > /tmp/campaign.log 2>&1 &

Reads the queue (``research/campaign.toml``: batches of candidates x seeds, candidates from
``research/candidates.toml``), skips every (candidate, seed) already in the record (``research/results/campaign-runs.jsonl``),
and trains the rest in order, each in a fresh process (``screen.run_one``: the candidate's network, optimizer
and augmentation, one ``fit`` on the bundled train split, scored on the test split). Each finished run is
one JSON line with the machine, the date and the code's commit; with ``--commit`` that line is committed to
the repository at once, so a session that ends keeps every finished run and the next start resumes the queue.
Accuracy runs are deterministic, so another process on the machine slows them but does not change them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import code_commit, cpu_description  # noqa: E402
from research import RESULTS_DIR, screen  # noqa: E402

QUEUE = Path(__file__).with_name("campaign.toml")
RECORD = RESULTS_DIR / "campaign-runs.jsonl"


def queued_pairs(queue: dict) -> list[tuple[str, int]]:
    """(candidate, seed) in run order: batch by batch, every candidate's seed before the next seed."""
    return [(name, seed) for batch in queue["batch"] for seed in batch["seeds"] for name in batch["candidates"]]


def finished_pairs(record: Path) -> set[tuple[str, int]]:
    """Pairs the record already holds (a run that failed counts too: rerunning it would fail the same way)."""
    if not record.is_file():
        return set()
    done = set()
    for line in record.read_text().splitlines():
        try:
            run = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash: that run is run again
        done.add((run["name"], int(run["seed"])))
    return done


def commit_record(record: Path, message: str, tries: int = 20) -> bool:
    """Commit the record alone (``--only``: whatever else is staged stays staged), retrying while git is busy."""
    repo = ["git", "-C", str(record.parent)]
    for _ in range(tries):
        added = subprocess.run([*repo, "add", record.name], capture_output=True, text=True)
        done = subprocess.run([*repo, "commit", "--quiet", "--only", "-m", message, "--", record.name],
                              capture_output=True, text=True) if added.returncode == 0 else added
        if done.returncode == 0:
            return True
        time.sleep(15)  # most likely another git command holds the index lock
    print(f"could not commit {record}: {done.stderr.strip()}", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=Path, default=QUEUE)
    parser.add_argument("--candidates", type=Path, default=screen.CANDIDATES)
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/train-mnist-screen"))
    parser.add_argument("--commit", action="store_true", help="commit the record after each run")
    args = parser.parse_args(argv)
    candidates = {c["name"]: c for c in tomllib.loads(args.candidates.read_text())["candidate"]}
    pairs = queued_pairs(tomllib.loads(args.queue.read_text()))
    unknown = sorted({name for name, _ in pairs} - set(candidates))
    if unknown:
        parser.error(f"{args.queue} names candidates that {args.candidates} does not define: {unknown}")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.record.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), **cpu_description()}
    commit = code_commit()
    context = multiprocessing.get_context("spawn")
    for name, seed in pairs:
        if (name, seed) in finished_pairs(args.record):
            continue
        candidate = candidates[name]
        for split in ("train", "test"):
            screen.load_split(candidate["dataset"], split, args.cache)
        job = {"name": name, "dataset": candidate["dataset"], "seed": seed, "cache": str(args.cache),
               "config": {k: v for k, v in candidate.items() if k not in ("name", "dataset")}}
        print(f"{datetime.datetime.now(datetime.UTC):%H:%M:%S} start {name} seed {seed}", flush=True)
        with context.Pool(1, maxtasksperchild=1) as pool:  # a fresh process per run: nothing carries over
            result = pool.apply(screen._worker, (job,))
        result |= {"machine": machine, "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "code_commit": commit, "command": "python research/campaign.py"}
        with open(args.record, "a") as out:
            out.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
        if args.commit:
            accuracy = result.get("test_accuracy")
            outcome = f"{accuracy:.4f}" if accuracy is not None else result.get("error", "failed")[:80]
            commit_record(args.record, f"Campaign: {name} seed {seed}: {outcome} ({machine['cpu_model']}, family {machine['cpu_family']} model {machine['cpu_model_number']})")
    print("queue finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
