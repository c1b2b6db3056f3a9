"""A training process a test can SIGKILL: ``python -m tests.support.train_worker PARQUET OUT BACKUP CONFIG_JSON``.

Prints ``epoch N/M`` after each completed epoch and ``saved PATH`` at the end (flushed, one per line).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.training.recipes import TrainConfig
from tasks.training.train import train_model


def main(argv: list[str]) -> int:
    train_parquet, out_dir, backup_root, config_json = argv
    config = TrainConfig.model_validate_json(config_json)

    def report(epoch: int, total: int, logs: dict[str, float]) -> None:
        print(f"epoch {epoch}/{total}", flush=True)

    path = train_model(Path(train_parquet), 10, config, Path(out_dir), on_epoch=report, backup_root=Path(backup_root))
    print(f"saved {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
