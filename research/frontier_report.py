"""The frontier's outputs for people: the table (frontier.md) and the plot (frontier.png), one line per recipe."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.targets import TARGETS

TABLE_HEADER = "| dataset | recipe | model | budget | epochs | test accuracy, mean | each seed | CPU-min | wall min |"


def write_report(report: dict[str, Any], json_path: Path) -> None:
    """The report as JSON at ``json_path``, and its table (.md) and plot (.png) beside it."""
    write_atomically(json_path, json.dumps(report, indent=2, default=str) + "\n")
    write_atomically(json_path.with_suffix(".md"), markdown(report["summary"], report))
    plot(report["summary"], report["points"], json_path.with_suffix(".png"))


def write_atomically(dest: Path, text: str) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dest)


def summarize(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per dataset, recipe and budget: the mean over seeds, and each run's accuracy and epochs run (fewer
    than planned where early stopping ended the run)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["dataset"], point["recipe"], point["budget"]), []).append(point)
    return [{"dataset": dataset, "recipe_name": runs[0].get("recipe_name", "shipped"), "budget": budget,
             "epochs": runs[0]["epochs"], "model": runs[0]["model"],
             "seeds": [r["seed"] for r in runs], "accuracies": [r["test_accuracy"] for r in runs],
             "epochs_run": [r.get("epochs_run", r["epochs"]) for r in runs],
             "mean_accuracy": statistics.fmean(r["test_accuracy"] for r in runs),
             "mean_cpu_minutes": statistics.fmean(r["cpu_minutes"] for r in runs),
             "mean_wall_minutes": statistics.fmean(r["wall_minutes"] for r in runs)}
            for (dataset, _, budget), runs in groups.items()]


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    commands = ", ".join(f"`{command}`" for command in meta.get("commands") or [meta["command"]])
    lines = [f"Accuracy vs CPU-minutes ({commands}; {meta['machine']['cpus']} CPUs "
             f"{meta['machine']['cpu_model']}, {meta['finished']}; train rows: {row_counts(meta)}).",
             "CPU-minutes: process CPU time of train_model + evaluate_model (all threads); wall in minutes.", "",
             *table(summary)]
    return "\n".join(lines) + "\n"


def table(summary: list[dict[str, Any]]) -> list[str]:
    """The frontier's Markdown table, one line per (dataset, recipe, budget): in frontier.md and README."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(summary, key=lambda r: (r["dataset"], r["recipe_name"], r["budget"])):
        each = ", ".join(f"{seed}: {100 * acc:.2f}{stopped_early(ran, row['epochs'])}"
                         for seed, acc, ran in zip(row["seeds"], row["accuracies"], row["epochs_run"], strict=True))
        lines.append(f"| {row['dataset']} | {row['recipe_name']} | {row['model']} | {row['budget']:g} | {row['epochs']} | "
                     f"{100 * row['mean_accuracy']:.2f} % | {each} | {row['mean_cpu_minutes']:.2f} | "
                     f"{row['mean_wall_minutes']:.2f} |")
    return lines


def stopped_early(epochs_run: int, epochs: int) -> str:
    return f" (stopped after {epochs_run})" if epochs_run < epochs else ""


def table_in(text: str) -> list[str]:
    """The frontier table's lines in a Markdown text (README's Models section), or [] if it has none."""
    lines = text.splitlines()
    start, end = table_span(lines)
    return lines[start:end]


def table_span(lines: list[str]) -> tuple[int, int]:
    """Where the frontier table starts and ends in ``lines`` (0, 0 if it has none)."""
    if TABLE_HEADER not in lines:
        return 0, 0
    start = lines.index(TABLE_HEADER)
    return start, next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))


def write_table_into(readme: Path, summary: list[dict[str, Any]]) -> bool:
    """Replace the frontier table in ``readme`` with ``summary``'s; whether anything changed."""
    lines = readme.read_text().splitlines(keepends=True)
    start, end = table_span([line.rstrip("\n") for line in lines])
    if start == end:
        raise ValueError(f"{readme} has no frontier table (a line {TABLE_HEADER!r}) to replace")
    new = [line + "\n" for line in table(summary)]
    if lines[start:end] == new:
        return False
    readme.write_text("".join([*lines[:start], *new, *lines[end:]]))
    return True


def row_counts(report: dict[str, Any]) -> str:
    return ", ".join(sorted({str(p["train_rows"]) for p in report.get("points", [])})) or "all"


def plot(summary: list[dict[str, Any]], points: list[dict[str, Any]], dest: Path) -> Path:
    """One panel per dataset: each run as a dot, each recipe's mean over seeds as a line labelled with its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row["dataset"] for row in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for name in dict.fromkeys(r["recipe_name"] for r in summary if r["dataset"] == dataset):
            rows = sorted((r for r in summary if r["dataset"] == dataset and r["recipe_name"] == name),
                          key=lambda r: r["mean_cpu_minutes"])
            runs = [p for p in points if p["dataset"] == dataset and p.get("recipe_name", "shipped") == name]
            line, = ax.plot([r["mean_cpu_minutes"] for r in rows], [100 * r["mean_accuracy"] for r in rows],
                            marker="o", label=f"{name} ({rows[0]['model']}), mean")
            ax.scatter([p["cpu_minutes"] for p in runs], [100 * p["test_accuracy"] for p in runs], s=12, alpha=0.4,
                       color=line.get_color())
            for i, r in enumerate(rows):  # labels alternate below and above the line, clear of close neighbours
                ax.annotate(f"{r['budget']:g}x ({r['epochs']} ep)", (r["mean_cpu_minutes"], 100 * r["mean_accuracy"]),
                            textcoords="offset points", xytext=(4, 6 if i % 2 else -12), fontsize=8)
        target = TARGETS.get(f"{dataset.replace('-', '_')}_accuracy")
        if target is not None:
            ax.axhline(100 * target[0], color="grey", linestyle="--", linewidth=1,
                       label=f"target {100 * target[0]:.2f} % (3-seed mean of the night)")
        ax.set(title=dataset, xlabel="CPU-minutes (train + evaluate); dots: each seed", ylabel="test accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)  # below: clear of the points
    fig.tight_layout()
    tmp = dest.with_name(f".{dest.stem}.tmp{dest.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, dest)
    return dest


def main() -> None:
    """Redraw the frontier's table and plot from its JSON (beside it) and put the table into README."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", nargs="?", type=Path, default=Path("bench/frontier.json"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    report["summary"] = summarize(report["points"])  # in step with the points, whichever code wrote them
    write_report(report, args.report)
    changed = write_table_into(args.readme, report["summary"])
    print(f"{args.report.with_suffix('.md')}, {args.report.with_suffix('.png')} redrawn; {args.readme}: frontier table "
          f"{'updated' if changed else 'already matches'}")


if __name__ == "__main__":
    main()
