"""The log of a run that stops for an expected reason: one clean line, no traceback.

An expected failure (failed download checks, failed validation, a failed gate, a refused or impossible
champion comparison, a refused publish) is told once by the stage that found it, and its reasons are the
run's state message; only a real bug shows a traceback.
"""

from __future__ import annotations

import logging

from tasks.reporting.outcomes import NotPublished

ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")


class ExpectedFailureLogFilter(logging.Filter):
    """Keeps Prefect's engines from repeating an expected failure with tracebacks.

    Prefect 3.8 logs a task's exception with its traceback ("Task run failed with exception"), its
    final state at ERROR with the whole message, and, for a deployment run that ends Failed, "Engine
    execution exited with unexpected exception" with another traceback. For the expected failures
    (``expected``) the run already logs the reasons once and its state message holds them, so records
    carrying such an exception are dropped and the task's final-state line becomes one short INFO
    line. Any other exception is logged by Prefect as usual, traceback included.
    """

    def __init__(self, expected: tuple[type[BaseException], ...]):
        super().__init__("train-mnist-expected-failures")
        self.expected = (*expected, NotPublished)
        self._markers = tuple(f"encountered an exception {cls.__name__}:" for cls in with_subclasses(self.expected))

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, self.expected):
            return False
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) \
                and record.msg.startswith("Finished in state Failed(") and any(m in record.msg for m in self._markers):
            first = record.msg.split("\\n", 1)[0].split("\n", 1)[0]
            record.msg, record.args = "%s", (first.replace("Finished in state Failed('Task run encountered an "
                                                          "exception ", "Finished in state Failed: ", 1),)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def with_subclasses(classes: tuple[type[BaseException], ...]) -> set[type[BaseException]]:
    """``classes`` and every subclass of theirs defined so far (the engine's messages name the concrete class)."""
    found, todo = set(), list(classes)
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def quiet_expected_failures(expected: tuple[type[BaseException], ...]) -> None:
    """Install the filter on Prefect's engine loggers once per process (a flow calls this when it starts)."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, ExpectedFailureLogFilter)]
        logger.addFilter(ExpectedFailureLogFilter(expected))
