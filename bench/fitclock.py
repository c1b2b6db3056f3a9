"""Time spent inside ``keras.Model.fit``, measured from outside, so ``tasks/training/train.py`` needs no timing code."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import flops


@dataclass
class FitCall:
    """One ``fit`` call: who made it, how long it took, what it saw, and each epoch's duration."""

    label: str  # the Prefect task run's name (e.g. ``train-mnist-cnn-bn``), else the model's name
    model_id: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the whole process's CPU time during the call (all threads)
    train_samples: int = 0
    validation_samples: int = 0
    forward_flops: int = 0
    epoch_seconds: list[float] = field(default_factory=list)


def _rows(data: Any) -> int | None:
    """Rows of an array-like input; None for inputs without a length (e.g. a tf.data pipeline)."""
    if isinstance(data, (tuple, list)) and data and not hasattr(data, "shape"):
        data = data[0]
    try:
        return len(data)
    except TypeError:
        return None


def _label(model: Any) -> str:
    with contextlib.suppress(Exception):  # outside a task run there is no context; fall back to the model
        from prefect.context import TaskRunContext

        context = TaskRunContext.get()
        if context is not None:
            return context.task_run.name
    return model.name


class FitClock:
    """Wraps keras.Model.fit in this process; adds up time, samples and FLOPs of every call."""

    def __init__(self) -> None:
        self.calls: list[FitCall] = []
        self.label: str | None = None  # set by ``labelled``; else each call is named by its context

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Name the fit calls made inside this block ``label``."""
        self.label = label
        try:
            yield
        finally:
            self.label = None

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

    @property
    def samples(self) -> int:
        return sum(c.train_samples for c in self.calls)

    @contextlib.contextmanager
    def installed(self) -> Iterator[FitClock]:
        from tasks.model_io import import_keras

        keras = import_keras()
        model_cls = keras.Model
        original = model_cls.fit

        class EpochTimer(keras.callbacks.Callback):
            def __init__(self, call: FitCall) -> None:
                super().__init__()
                self.call, self.started, self.batches = call, 0.0, 0

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.batches += 1

            def on_epoch_end(self, epoch, logs=None):
                self.call.epoch_seconds.append(time.perf_counter() - self.started)

        def fit(model, x=None, y=None, *args, **kwargs):
            call = FitCall(label=self.label or _label(model), model_id=id(model), forward_flops=flops.model_forward_flops(model))
            timer = EpochTimer(call)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), timer]
            cpu, start = time.process_time(), time.perf_counter()
            try:
                history = original(model, x, y, *args, **kwargs)
            finally:
                call.seconds = time.perf_counter() - start
                call.cpu_seconds = time.process_time() - cpu
                self.calls.append(call)
            epochs = len(history.epoch)
            rows = _rows(x)
            # Without a length (a dataset pipeline) the count is batches x batch size, the last batch rounded up.
            call.train_samples = rows * epochs if rows is not None else timer.batches * kwargs.get("batch_size", 32)
            validation = _rows(kwargs.get("validation_data"))
            call.validation_samples = (validation or 0) * epochs
            return history

        model_cls.fit = fit
        try:
            yield self
        finally:
            model_cls.fit = original

    def utilization(self, matmul: dict[str, float], label: str | None = None) -> dict[str, Any]:
        """FLOP/s achieved inside fit (all calls, or those of ``label``) over the matmul rate; also per CPU second."""
        calls = [c for c in self.calls if label is None or c.label == label]
        seconds, cpu_seconds = sum(c.seconds for c in calls), sum(c.cpu_seconds for c in calls)
        work = sum(flops.fit_flops(c.forward_flops, c.train_samples, c.validation_samples) for c in calls)
        return {"utilization": work / seconds / matmul["flops_per_second"], "fit_flops_per_second": work / seconds,
                "cpu_utilization": work / cpu_seconds / matmul["flops_per_cpu_second"],
                "fit_seconds": seconds, "fit_cpu_seconds": cpu_seconds, "train_samples": sum(c.train_samples for c in calls),
                "validation_samples": sum(c.validation_samples for c in calls),
                "forward_flops_per_sample": calls[0].forward_flops if calls else 0, "fit_calls": len(calls)}

    def steady_utilization(self, matmul_flops_per_second: float, label: str | None = None) -> float | None:
        """As ``utilization``, over every epoch but the first (which also traces and compiles the step)."""
        calls = [c for c in self.calls if label is None or c.label == label]
        epochs = [(c, s) for c in calls for s in c.epoch_seconds][1:]
        if not epochs:
            return None
        work = sum(flops.fit_flops(c.forward_flops, c.train_samples, c.validation_samples) / len(c.epoch_seconds)
                   for c, _ in epochs)
        return work / sum(s for _, s in epochs) / matmul_flops_per_second

    def labels(self) -> list[str]:
        return list(dict.fromkeys(c.label for c in self.calls))
