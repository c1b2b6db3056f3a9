"""The command line: ``python flows/train.py [options]``, ``train-mnist [options]``, ``train-mnist predict``,
``train-mnist serve`` and the operator's ``train-mnist rollback | pin | unpin``.

The options are the flow's own parameters, described as the flow's docstring describes them (the
Prefect UI's run form shows the same text), so the CLI and the UI cannot drift apart. Exit codes: 0 when
every dataset was published, 1 when one was not, 2 for invalid parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, get_args

from tasks.training.recipes import ModelKind


def parameter_help() -> dict[str, str]:
    """The flow's own parameter descriptions (its docstring, as the Prefect UI's run form shows them)."""
    from prefect.utilities.callables import parameter_schema

    from flows.train import train_mnist

    properties = parameter_schema(train_mnist.fn).properties
    return {name: f"{p.get('description', '')} (default {p['default']})" if p.get("default") is not None
            else p.get("description", "") for name, p in properties.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flow's parameters as options, described as the flow describes them."""
    parser = argparse.ArgumentParser(
        prog="python flows/train.py",
        description="Download, validate, convert, train, evaluate, gate and publish MNIST-like datasets.",
        epilog="`train-mnist predict --help`: score a CSV with a dataset's production model; "
               "`train-mnist serve --help`: serve the production models over HTTP; "
               "`train-mnist rollback|pin|unpin --help`: move production back, or freeze it.",
    )
    kinds: dict[str, dict[str, Any]] = {
        "model": {"choices": list(get_args(ModelKind))}, "epochs": {"type": int}, "min_accuracy": {"type": float},
        "min_class_recall": {"type": float}, "train_rows": {"type": int}, "seed": {"type": int},
        "promotion_tolerance": {"type": float}, "fan_out": {"action": "store_true", "default": None},
        "child_timeout_minutes": {"type": float}}
    for name, help_text in parameter_help().items():
        parser.add_argument(f"--{name.replace('_', '-')}", help=help_text, **kinds.get(name, {}))
    return parser.parse_args(argv)


# Prefect reads its settings once, when it is first imported: these must be in the environment before that.
LOCAL_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline: no telemetry errors in the log
    # A first run without a server starts a temporary one, whose database is created then: Prefect's 20 s were
    # not enough on a busy 2-core machine (the run failed before any work).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def use_local_prefect_defaults() -> None:
    """Set the defaults above where the user has not set them."""
    for name, value in LOCAL_PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    as_command = argv is None
    argv = sys.argv[1:] if argv is None else argv
    use_local_prefect_defaults()
    if argv[:1] == ["predict"]:
        from tasks.serving.predict import main as predict_main

        code = predict_main(argv[1:])
        if as_command:
            # TensorFlow's native threads can abort the interpreter's teardown ("terminate called without an
            # active exception": 1 run in 12 of a failing predict here). A finished predict has written its
            # output atomically and has nothing left to clean up, so it leaves without the teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    if argv[:1] == ["serve"]:
        from tasks.serving.server import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] and argv[0] in ("rollback", "pin", "unpin"):
        from tasks.publishing.operations import main as operation_main

        return operation_main(argv[0], argv[1:])
    args = parse_args(argv)
    from flows.train import train_mnist

    params: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:  # the flow signature's domains, checked before any work (as the server does for deployments)
        train_mnist.validate_parameters(params)
    except Exception as exc:  # noqa: BLE001 - Prefect's ParameterTypeError names the field and the reason
        print(f"train-mnist: invalid parameters: {exc}", file=sys.stderr)
        return 2
    state = train_mnist(**params, return_state=True)
    if state.is_completed():
        for name, version in state.result().items():
            print(f"published {name} {version}")
        return 0
    print(f"train-mnist {state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
