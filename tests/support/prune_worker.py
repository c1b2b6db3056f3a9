"""A pruning process a test can SIGKILL: ``python -m tests.support.prune_worker REGISTRY DATASET KEEP_LAST``.

Prints ``ready`` once imported, waits for a line on stdin, then prunes (production protected) and prints ``done``.
Before it removes each version's trash folder it prints ``removing``, so a test can kill it at a chosen step.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tasks.registry.retention import RetentionPolicy, prune_versions


def main(argv: list[str]) -> int:
    registry, dataset, keep_last = Path(argv[0]), argv[1], int(argv[2])
    root = registry / dataset
    real_rmtree = shutil.rmtree

    def announced_rmtree(path, *args, **kwargs):
        print("removing", flush=True)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = announced_rmtree
    print("ready", flush=True)
    sys.stdin.readline()
    versions = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    production = (root / "production").read_text().strip()
    prune_versions(registry, dataset, versions, {production}, RetentionPolicy(keep_last=keep_last, keep_days=30))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
