"""WebDataset tar shards, as training data (blip2.train.data) and bulk jobs (blip2.bulk) read them.

A sample is the members sharing a key: the member's path up to the first dot of its file name
(``dir/000123.jpg`` and ``dir/000123.txt`` are sample ``dir/000123``). Shards are indexed once and a
member is read again by its byte offset, never by walking the tar. Shard lists may use the WebDataset
brace form, ``shards-{000000..000009}.tar``.
"""

from __future__ import annotations

import os
import re

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def split_key(name: str) -> tuple[str, str]:
    """A member's name -> (its sample's key, its extension, lower case; "" for none)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def expand_braces(spec: str) -> list[str] | None:
    """The names ``shards-{000..009}.tar`` stands for (zero-padded as written); None without a range."""
    m = _BRACES.search(spec)
    if m is None:
        return None
    lo, hi = m.group(1), m.group(2)
    return [f"{spec[: m.start()]}{i:0{len(lo)}d}{spec[m.end() :]}" for i in range(int(lo), int(hi) + 1)]


def read_member(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of a shard: a member's data, found when the shard was indexed."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: shard member cut short ({len(data)} of {size} bytes)")
    return data
