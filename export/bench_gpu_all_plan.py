"""The plan of ``unidg bench gpu --all``: its records (one ``PlanRow`` per row, the ``AllResult``), the time budget,
and ``Plan``, which runs rows in order within the budget and reports after every change."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

STOCK_STEP_ROW = "stock diffusers step, eager"  # the reference of every ratio: it runs whatever --only selects


class BudgetSpent(BaseException):
    """Raised inside a row when the run's time budget ends (SIGALRM). A BaseException, like KeyboardInterrupt, so the
    ``except Exception`` of a row (or of a library it calls) cannot turn the end of the budget into another error."""


class RowSkipped(Exception):
    """A row that cannot run on this machine; the message says why (e.g. onnxruntime-gpu not installed)."""


# ------------------------------------------------------------------------------------------------------- records
@dataclass
class PlanRow:
    name: str
    group: str  # step | attention | sample | derived | train | onnx
    status: str = "pending"  # pending | running | done | failed | skipped
    tokens: int | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    speedup_vs_stock: float | None = None  # stock eager time / this time (step rows: per step, sample rows: per sample)
    peak_memory_gib: float | None = None
    configuration: str = ""
    note: str = ""
    error: str = ""
    seconds: float | None = None  # wall time the row took, set-up and compilation included


@dataclass
class AllResult:
    date: str
    dry_run: bool
    budget_s: float
    preset: str
    resolution: int
    steps: int
    repeats: int
    dtype: str
    machine: dict = field(default_factory=dict)
    rows: list[PlanRow] = field(default_factory=list)
    winners: dict = field(default_factory=dict)
    attention: dict | None = None
    tile_sweep: dict | None = None
    train: dict | None = None
    elapsed_s: float = 0.0
    complete: bool = False
    note: str = ""
    command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------- budget
class Budget:
    """The run's time budget, counted from its start on ``clock`` (seconds)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.started = float(seconds), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise ``BudgetSpent`` in the main thread after ``seconds`` (POSIX main thread only; elsewhere a no-op)."""
    usable = hasattr(signal, "SIGALRM") and _is_main_thread()
    if not usable:
        yield
        return

    def stop(signum, frame):
        raise BudgetSpent(f"the time budget ran out after this row ran {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Plan:
    """Runs rows in order within a ``Budget``; ``report()`` after every change, so the files are always current."""

    def __init__(
        self,
        result: AllResult,
        budget: Budget,
        report: Callable[[], None],
        dry_run: bool,
        only: tuple[str, ...] = (),
    ) -> None:
        self.result, self.budget, self.report, self.dry_run = result, budget, report, dry_run
        self.only = tuple(word.lower() for word in only)

    def row(self, name: str, group: str, estimate_s: float, measure: Callable[[PlanRow], None]) -> PlanRow:
        """``estimate_s``: what the row needs on a GPU (ignored in a dry run); a row that needs more than is left
        is skipped ("budget"); one still running when the budget ends is stopped and recorded as failed."""
        row = PlanRow(name, group)
        self.result.rows.append(row)
        if self.only and name != STOCK_STEP_ROW and not any(word in name.lower() for word in self.only):
            row.status, row.note = "skipped", "not selected (--only)"
            self.report()
            return row
        remaining = self.budget.remaining()
        needed = 0.0 if self.dry_run else estimate_s
        if remaining <= 0 or remaining < needed:
            row.status = "skipped"
            row.note = f"budget: needs ~{needed:.0f} s, {max(remaining, 0):.0f} s of {self.budget.seconds:.0f} s left"
            print(f"  {name}: skipped ({row.note})", flush=True)
            self.report()
            return row
        row.status = "running"
        self.report()
        started = self.budget.clock()
        try:
            with _alarm(remaining):
                measure(row)
            row.status = "done" if not row.error else "failed"
        except BudgetSpent as error:
            row.status, row.error = "failed", f"budget: {error}"
        except RowSkipped as reason:
            row.status, row.note = "skipped", str(reason)
        except Exception as error:  # one failing path (a torch/Triton version that rejects it) must not cost the rest
            row.status = "failed"
            row.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
        row.seconds = round(self.budget.clock() - started, 2)
        shown = row.error or (f"{row.median_ms:.2f} ms" if row.median_ms is not None else row.note)
        if not row.error and row.speedup_vs_stock is not None:
            unit = "sample" if group in ("sample", "derived") else "step"
            shown += f" ({row.speedup_vs_stock:.2f}x the stock eager {unit})"
        print(f"  {name}: {shown}", flush=True)
        self.report()
        return row


def record_speedup(row: PlanRow, stock: PlanRow | None) -> None:
    """``row``'s speed-up over the stock row it is compared with, where both were measured."""
    if stock is not None and stock.median_ms and row.median_ms:
        row.speedup_vs_stock = round(stock.median_ms / row.median_ms, 3)
