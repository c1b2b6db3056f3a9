"""Small things a user sees on the command line and in the run folder: progress, --seed help, the curves plot."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flows.cli import LOCAL_PREFECT_DEFAULTS, parse_args
from tasks.model_io import import_keras
from tasks.settings import PROJECT_ROOT
from tasks.training.train import plot_training_curves, progress_callback


def test_progress_is_reported_inside_an_epoch_by_a_real_fit():
    keras = import_keras()
    calls = []
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).random((64, 4), dtype=np.float32), np.arange(64) % 2
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[progress_callback(lambda *args: calls.append(args), epochs=2, batches=8, every_s=0.0)])
    assert [(c[0], c[2]) for c in calls] == [(e, b) for e in (1, 2) for b in range(1, 9)]
    epoch, epochs, batch, batches, logs = calls[-1]
    assert (epoch, epochs, batch, batches) == (2, 2, 8, 8)
    assert isinstance(logs["loss"], float) and 0.0 <= logs["accuracy"] <= 1.0


def test_seed_has_help_text(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text.split("options:", 1)[1]
    seed_help = options.split("--seed SEED", 1)[1].split("--promotion-tolerance", 1)[0]
    assert "the same seed and data give the same model" in seed_help


def test_one_epoch_curves_have_a_title_and_sensible_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen["title"] = fig._suptitle.get_text() if fig._suptitle else ""
        seen["ylim"] = [ax.get_ylim() for ax in fig.axes]
        seen["xticks"] = [list(ax.get_xticks()) for ax in fig.axes]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    curves = {"loss": [0.62], "val_loss": [0.40], "accuracy": [0.81], "val_accuracy": [0.88]}
    dest = plot_training_curves(curves, tmp_path / "curves.png", "mlp: 4500 training rows")
    assert Image.open(dest).size[0] > 0
    assert seen["title"].startswith("Training curves (1 epoch)") and "mlp" in seen["title"]
    loss_ylim, accuracy_ylim = seen["ylim"]
    assert loss_ylim[0] == 0.0 and loss_ylim[1] > 0.62
    assert accuracy_ylim[1] == 1.0 and accuracy_ylim[0] <= 0.76  # not a 0.96..1.04 zoom on one dot
    assert all(float(t).is_integer() for ticks in seen["xticks"] for t in ticks)


def test_a_run_without_hold_out_plots_no_validation_curve(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    real_savefig, labels = plt.Figure.savefig, {}

    def capture(fig, *args, **kwargs):
        labels["legend"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    plot_training_curves({"loss": [0.9, 0.2], "accuracy": [0.7, 0.95]}, tmp_path / "curves.png", "cnn7: none held out")
    assert labels["legend"] == [["train"], ["train"]]


# In a fresh interpreter: the command's entry point, then what Prefect's settings say.
SETTINGS_AFTER_THE_COMMAND = """
import flows.cli
try:
    flows.cli.main(["--help"])
except SystemExit:
    pass
from prefect.settings import get_current_settings
settings = get_current_settings()
print(settings.server.ephemeral.startup_timeout_seconds, settings.server.analytics_enabled)
"""


@pytest.mark.parametrize("user_value", [None, "7"])
def test_the_command_gives_prefect_its_local_defaults_before_prefect_reads_them(user_value):
    """A first run starts a temporary Prefect server whose database is created then: 20 s (Prefect's default wait)
    was too short on a busy 2-core machine. The defaults reach Prefect's settings; a user's own value wins."""
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_PREFECT_DEFAULTS}
    if user_value is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    done = subprocess.run([sys.executable, "-c", SETTINGS_AFTER_THE_COMMAND], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    timeout = user_value or LOCAL_PREFECT_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    assert done.stdout.splitlines()[-1] == f"{timeout} False"
