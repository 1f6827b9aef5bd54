"""Typed reads from the JSON files of a checkpoint: a wrong type or an out-of-range value is a
``CheckpointError`` naming the file, the key and what it must be, never a ``TypeError`` further on."""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

from .errors import CheckpointError


def _shown(value: Any) -> str:
    """A value as it reads in the JSON file, cut short."""
    text = (
        json.dumps(value)
        if isinstance(value, (dict, list, str, int, float, bool, type(None)))
        else repr(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def is_integer(value: Any) -> bool:
    """A JSON integer (``true`` and ``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


class JsonFields:
    """Typed reads from one JSON object of a checkpoint file (``config.json``, its sections, a shard index,
    ``generation_config.json``).

    A key that is absent or null gives the default; a value of the wrong type or out of range is a
    ``CheckpointError`` naming the file, the key (``vision_config.hidden_size``) and what it must be.
    """

    def __init__(self, data: Any, source: str, where: str = ""):
        if not isinstance(data, dict):
            what = where or "the file"
            raise CheckpointError(f"{source}: {what} must be a JSON object, not {_shown(data)}")
        self.data, self.source, self.where = data, source, where

    def key(self, name: str) -> str:
        """The dotted path of ``name`` in the file, for messages."""
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{self.source}: {self.key(name)} must be {expected}, not {_shown(self.data.get(name))}"
        )

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def _first(self, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if self.has(n)), None)

    def section(self, name: str) -> JsonFields:
        """A nested object (absent or null: empty)."""
        value = self.data.get(name)
        return JsonFields({} if value is None else value, self.source, self.key(name))

    def integer(self, *names: str, default: Any = None, min: int | None = None, listed: bool = False) -> Any:
        """The first of ``names`` present, an integer (>= ``min``). ``listed``: ``[n, ...]`` gives ``n``."""
        name = self._first(names)
        if name is None:
            return default
        value = self.data[name]
        if listed and isinstance(value, list) and value:
            value = value[0]
        expected = "an integer" + (f" >= {min}" if min is not None else "")
        if not is_integer(value) or (min is not None and value < min):
            raise self.fail(name, expected + (" (or a list of them)" if listed else ""))
        return value

    def number(self, *names: str, default: Any = None, positive: bool = False) -> Any:
        """The first of ``names`` present, a finite number (> 0 when ``positive``)."""
        name = self._first(names)
        if name is None:
            return default
        value = self.data[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise self.fail(name, "a positive number" if positive else "a finite number")
        return float(value)

    def flag(self, *names: str, default: Any = None) -> Any:
        name = self._first(names)
        if name is None:
            return default
        if not isinstance(self.data[name], bool):
            raise self.fail(name, "true or false")
        return self.data[name]

    def text(self, *names: str, default: Any = None, choices: Collection[str] | None = None) -> Any:
        name = self._first(names)
        if name is None:
            return default
        value = self.data[name]
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(name, "a string" if choices is None else f"one of {sorted(choices)}")
        return value

    def texts(self, name: str) -> list[str]:
        """A list of strings (absent or null: empty)."""
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "a list of strings")
        return value

    def token_id(self, name: str, default: int | None, vocab_size: int | None = None) -> int | None:
        """A token id: absent gives ``default``, null gives None (no such token)."""
        if name not in self.data:
            return default
        value = self.data[name]
        if value is None:
            return None
        if not is_integer(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
            limit = f" below the vocabulary size {vocab_size}" if vocab_size is not None else ""
            raise self.fail(name, f"a token id (an integer >= 0{limit}) or null")
        return value

    def divisible(self, width: str, heads: str, width_value: int, heads_value: int) -> None:
        """Attention splits ``width`` evenly over ``heads``."""
        if width_value % heads_value:
            raise CheckpointError(
                f"{self.source}: {self.key(width)} ({width_value}) must be divisible by "
                f"{self.key(heads)} ({heads_value})"
            )
