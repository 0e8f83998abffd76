"""Submitting tasks and gathering their results: retries, submission order, one-line failures.

Every task returns a `TaskOutput`: its value, the node it ran on and whether it fetched a shipped file set there
(`hn_export.cluster.node_files`), so the driver can count the transfers per node. A worker that dies (killed, out of
memory, its node lost) has its task retried up to `TASK_RETRIES` times by Ray; an exception raised by the task
itself is not retried (the same inputs would fail again). A task that cannot finish ends the run with one
`UserError` naming it and the reason; the tasks still queued are cancelled.

Test hook: ``HN_EXPORT_TEST_TASK_EXIT=KIND:INDEX:ATTEMPTS:DIR`` (read by the driver, handed to the tasks) makes the
first ATTEMPTS attempts of task INDEX of kind KIND (``calibration``, ``grid``) end their worker with ``os._exit(1)``,
as a killed worker; DIR (on a filesystem the nodes share) counts the attempts.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from graph_passes.errors import GraphInputError
from hn_export.errors import UserError
from models.errors import ModelInputError
from runtime.errors import RuntimeInputError

logger = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after the first, for workers that die
FAULT_ENV = "HN_EXPORT_TEST_TASK_EXIT"
_USER_ERRORS = (UserError, GraphInputError, RuntimeInputError, ModelInputError)


@dataclasses.dataclass(frozen=True)
class TaskFault:
    """The test hook (see the module docstring): None when the variable is unset."""

    kind: str
    index: int
    attempts: int
    folder: Path

    @classmethod
    def from_env(cls) -> TaskFault | None:
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        kind, index, attempts, folder = text.split(":", 3)
        return cls(kind, int(index), int(attempts), Path(folder))

    def check(self, kind: str, index: int) -> None:
        """In the task: end this worker if this attempt is one of the first `attempts` of the chosen task."""
        if (kind, index) != (self.kind, self.index):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        done = len(list(self.folder.glob(f"{kind}-{index}-*")))
        if done < self.attempts:
            (self.folder / f"{kind}-{index}-{done}").touch()
            os._exit(1)


def check_fault(fault: TaskFault | None, kind: str, index: int) -> None:
    if fault is not None:
        fault.check(kind, index)


@dataclasses.dataclass
class TaskOutput:
    value: Any
    node: str
    fetched: bool  # this task copied a shipped file set onto its node


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@functools.lru_cache(maxsize=None)
def remote(function: Callable, cpus: float) -> Any:
    """`function` as a Ray remote function of `cpus` CPUs, retried when its worker dies, spread over the nodes."""
    import ray

    return ray.remote(num_cpus=cpus, max_retries=TASK_RETRIES, retry_exceptions=False,
                      scheduling_strategy="SPREAD")(function)


def _failure(label: str, exc: BaseException) -> UserError:
    """The one line for a task that cannot finish."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, _USER_ERRORS):
            return UserError(f"cluster task {label} failed: {cause}")
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return UserError(f"cluster task {label} failed: {type(cause).__name__}: {first}",
                         "run without --ray for the traceback")
    text = " ".join(str(exc).split())
    reason = text[:300] + ("..." if len(text) > 300 else "")
    return UserError(f"cluster task {label} failed after {TASK_RETRIES + 1} attempts: {type(exc).__name__}: "
                     f"{reason}", "check the nodes' memory and logs (`ray logs`), or run without --ray")


def gather(refs: Sequence[Any], labels: Sequence[str], fetched: Callable[[TaskOutput], None],
           desc: str, progress: bool) -> Iterator[Any]:
    """The tasks' values in submission order, each as soon as it and all before it are done (later ones wait,
    held by the driver). The first task that cannot finish raises its one-line `UserError` and cancels the rest."""
    import ray
    import ray.exceptions

    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    done: dict[int, Any] = {}
    next_index = 0
    try:
        with tqdm(total=len(refs), desc=desc, unit="task", disable=not progress) as bar:
            while next_index < len(refs):
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = index[ref]
                    try:
                        output: TaskOutput = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise _failure(labels[i], exc) from None
                    fetched(output)
                    done[i] = output.value
                    bar.update(1)
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1
    finally:
        if pending and ray.is_initialized():
            for ref in pending:
                ray.cancel(ref, force=True)
