"""What an evaluation leaves behind: ``<task>_report.json`` (scores, model, data, options, time), the
predictions beside it (re-scorable without the model), and a table on stdout."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class Run:
    """One evaluation run writing into ``folder``: predictions are appended to a ``.partial.jsonl`` file
    batch by batch (an interrupted run keeps them, and ``--predictions`` reads that file), then written
    as one JSON array at the end."""

    def __init__(self, folder: str | Path, task: str):
        self.folder = Path(folder)
        self.task = task
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.partial = self.folder / f"{task}_predictions.partial.jsonl"
        self.predictions = self.folder / f"{task}_predictions.json"
        self.report = self.folder / f"{task}_report.json"

    def start_predictions(self) -> None:
        self.partial.write_text("", encoding="utf-8")

    def add_predictions(self, records: Iterable[Mapping[str, Any]]) -> None:
        with self.partial.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish_predictions(self, records: list[Mapping[str, Any]]) -> Path:
        _write_json(self.predictions, records)
        self.partial.unlink(missing_ok=True)
        return self.predictions

    def write_report(
        self, scores: Mapping[str, Any], model: str | None, data: Mapping[str, Any], options: Mapping[str, Any],
        **extra: Any,
    ) -> Path:  # fmt: skip
        report = {
            "task": self.task,
            "scores": dict(scores),
            "model": model,
            "data": dict(data),
            "options": dict(options),
            "time": {
                "started": self.started.isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - self._t0, 3),
            },
            **extra,
        }
        _write_json(self.report, report)
        return self.report


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def format_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table: metric names left, values right (floats with 4 decimals)."""
    rows = [(name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in rows]
    width = max([len(title)] + [len(n) for n, _ in rows])
    value_width = max([len(v) for _, v in rows] + [5])
    rule = "-" * (width + 2 + value_width)
    lines = [title, rule] + [f"{n:<{width}}  {v:>{value_width}}" for n, v in rows] + [rule]
    return "\n".join(lines)
