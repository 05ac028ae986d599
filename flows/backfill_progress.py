"""A backfill's progress artifact: nights done of the total, the stage under
way and an estimated time of arrival, under a key of its own run (two backfills
at once keep their own bars). It listens to the progress the pipeline reports
(tasks/progress.py) and updates the artifact at most once a second, and at once
when a night is done."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.progress import Progress
from tasks.reports import artifact_key

MIN_INTERVAL_S = 1.0


def progress_key(flow_run_id: UUID | str) -> str:
    """The artifact key of one backfill run."""
    return artifact_key("backfill-progress", str(flow_run_id))


def eta_text(elapsed_s: float, done: int, total: int, now: dt.datetime) -> str:
    """When the remaining nights should be done, at the rate of those done."""
    if done == 0:
        return "ETA after the first night"
    if done >= total:
        return "all nights done"
    remaining_s = elapsed_s / done * (total - done)
    at = (now + dt.timedelta(seconds=remaining_s)).strftime("%Y-%m-%d %H:%M UTC")
    return f"ETA {at} (in {_duration(remaining_s)})"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


class BackfillProgress:
    """Progress listener of one backfill run; see the module docstring."""

    def __init__(self, key: str, nights: Sequence[str], *, title: str) -> None:
        self.nights = list(nights)
        self.done: set[str] = set()
        self.title = title
        self.stage = "starting"
        self._start = time.monotonic()
        self._night_start: float | None = None
        self._last = 0.0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=key, description=self.describe()
        )

    @property
    def fraction(self) -> float:
        return len(self.done) / len(self.nights) if self.nights else 1.0

    def describe(self) -> str:
        elapsed = time.monotonic() - (self._night_start or self._start)
        eta = eta_text(elapsed, len(self.done), len(self.nights), dt.datetime.now(dt.UTC))
        return (
            f"{self.title}: {len(self.done)} of {len(self.nights)} nights done; "
            f"under way: {self.stage}; {eta}"
        )

    def _update(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < MIN_INTERVAL_S:
            return
        self._last = now
        update_progress_artifact(
            artifact_id=self.artifact_id,
            progress=100.0 * self.fraction,
            description=self.describe(),
        )

    def phase(self, text: str) -> None:
        """A new step of the backfill begins (the index of the range, a period)."""
        self.stage = text
        self._update(force=True)

    def start_nights(self) -> None:
        """The per-night work begins: the ETA counts from here."""
        self._night_start = time.monotonic()

    def nights_done(self, nights: Iterable[str]) -> None:
        new = set(nights) & set(self.nights) - self.done
        if new:
            self.done |= new
            self._update(force=True)

    def finish(self, text: str) -> None:
        self.done = set(self.nights)
        self.stage = text
        self._update(force=True)

    def __call__(self, event: Progress) -> None:
        self.stage = f"{event.stage} {event.label} ({event.done}/{event.total} {event.unit})"
        if event.stage == "photometry" and event.done == event.total:
            self.nights_done([event.label])
        else:
            self._update()
