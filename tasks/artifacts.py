"""Every file name a stage writes, once: the run folder, the registry's version folders, the dataset's run log.

A run writes to ``<data-dir>/runs/<dataset>/<version>/``; a published version holds copies of some of
those beside the documents rendered at publish (README: Where outputs land).
"""

from __future__ import annotations

# ---- the run folder: validation ------------------------------------------------------------------
VALIDATION_JSON = "validation.json"  # drift numbers and GX results, passed or failed
VALIDATION_HTML = "validation.html"  # the same, as one self-contained page that opens offline
DATA_DOCS_DIR = "data_docs"  # GX Data Docs
PROFILE_FILE = "data_profile.json"  # each split's label counts and mean image; stored with a published version

# ---- the run folder: training and evaluation -----------------------------------------------------
MODEL_FILE = "model.keras"
CURVES_JSON = "training_curves.json"  # per-epoch loss and accuracy (the Keras History), train and validation
CURVES_PNG = "training_curves.png"
RESUME_FILE = "resume.json"  # whether this training resumed from a backup, and after which epoch
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.json"  # in a version: also the gate, lineage, promotion and canary
PREDICTIONS_FILE = "predictions.npy"  # the predicted class of every test row
PROBABILITIES_FILE = "probabilities.npy"  # the class probabilities of every test row (float32)

# ---- a published version -------------------------------------------------------------------------
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
MODEL_CARD = "model_card.md"
CANARY_FILE = "canary.npz"  # the canary batch and the predictions recorded for it at publish
VERSION_FILES = (MODEL_FILE, METRICS_FILE, CONFUSION_CSV, CONFUSION_PNG, MODEL_CARD, CANARY_FILE)

# ---- a dataset in the folder registry ------------------------------------------------------------
POINTER = "production"  # the current version's name
PIN_FILE = "pin.json"  # present while production is pinned: who pinned it, when and why
RUN_LOG = "runs.jsonl"  # one line per run, published or not (the registry's run log)
TREND_PNG = "runs.png"  # that log as a plot
# Names an earlier train-mnist wrote (before 2026-12-06): still read, never written.
LEGACY_CURVES_JSON = "history.json"
LEGACY_RUN_LOG = "history.jsonl"
