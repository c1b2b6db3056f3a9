"""docs/prefect-events.png: real train-mnist events on a throwaway Prefect server, shot in the UI's event feed.

    .venv/bin/python docs/events_screenshot.py      # needs chromium (Debian: apt-get install chromium)

On slices of the bundled MNIST files: data-watch (first look), a publishing run, a new train file, data-watch
again (data.changed), a run as the trigger starts it, and a run whose gate fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = 4311
DATASETS = """
[[dataset]]
name = "digits"
class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
train = { path = "mnist/mnist_train.csv.gz" }
test = { path = "mnist/mnist_test.csv.gz" }
gates = { min_accuracy = 0.5, min_class_recall = 0.0 }
recipe = { model = "mlp", epochs = 2 }
"""


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="events-shot-"))
    api = f"http://127.0.0.1:{PORT}/api"
    os.environ.update({"PREFECT_HOME": str(work / "home"), "PREFECT_API_URL": api,
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    sys.path.insert(0, str(ROOT))
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(PORT)], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_up(f"{api}/health")
        make_events(work)
        time.sleep(5)  # events are written asynchronously
        out = ROOT / "docs" / "prefect-events.png"
        subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={out}", "--window-size=1500,1000", "--virtual-time-budget=20000",
                        f"http://127.0.0.1:{PORT}/events?events=train-mnist.*"], capture_output=True, timeout=120,
                       check=True)
        print(f"wrote {out}")
    finally:
        os.killpg(server.pid, 2)
        server.wait(30)
    return 0


def wait_until_up(url: str) -> None:
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no Prefect server at {url}")


def make_events(work: Path) -> None:
    from flows.data_watch import data_watch
    from flows.train import train_mnist
    from tasks.settings import BUNDLED_MIRROR
    from tests.support.slices import cut_slice

    mirror = work / "mirror"
    for split, rows in (("train", 3000), ("test", 600)):
        name = f"mnist/mnist_{split}.csv.gz"
        cut_slice(BUNDLED_MIRROR / name, mirror / name, rows, keep_header=False)
    datasets = work / "datasets.toml"
    datasets.write_text(DATASETS)
    common = {"source": str(mirror), "datasets_file": str(datasets), "registry": str(work / "registry"),
              "data_dir": str(work / "data")}
    data_watch(dataset="digits", source=str(mirror), datasets_file=str(datasets))
    train_mnist(dataset="digits", **common, return_state=True)
    fresh = mirror / "fresh.csv.gz"
    cut_slice(BUNDLED_MIRROR / "mnist/mnist_train.csv.gz", fresh, 3000, keep_header=False, skip=3000)
    fresh.replace(mirror / "mnist/mnist_train.csv.gz")
    data_watch(dataset="digits", source=str(mirror), datasets_file=str(datasets))
    train_mnist(dataset="digits", **common, triggered_by="train-mnist.data.changed", trigger_debounce_minutes=0,
                return_state=True)
    train_mnist(dataset="digits", **common, min_accuracy=0.99, return_state=True)


if __name__ == "__main__":
    sys.exit(main())
