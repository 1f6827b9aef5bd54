"""What a bulk job reads: SOURCE -> a fixed, ordered list of inputs, and the bytes of one input.

SOURCE is one of
- a folder: every file under it, recursively (hidden files and folders left out), sorted;
- a glob (``photos/**/*.jpg``; ``**`` crosses folders), sorted, or a WebDataset brace range
  (``shards-{000..009}.tar``); matches ending in ``.tar`` are shards;
- a list of image paths: ``.txt`` (one per line; blank lines and ``#`` comments skipped), ``.jsonl``
  (``{"image": path}`` per line) or ``.parquet`` (column ``image``), in the list's order; relative paths
  are read relative to the list's folder;
- WebDataset ``.tar`` shards (one, a glob or a brace range of them): one input per sample (members
  sharing a key, see :mod:`blip2.shards`), its image the ``jpg`` / ``jpeg`` / ``png`` / ``webp`` member;
- a single image file.

An input is a row of :data:`INPUT_SCHEMA`: ``key`` (what the output calls it: the path as found, or the
sample's key), where its bytes are (``path``, and ``offset`` / ``size`` inside a shard), and ``error`` when
the scan already knows it cannot be read (a sample without an image). Inputs are never opened here:
reading is the decode workers' job.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..errors import InputError
from ..shards import expand_braces, split_key

INPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),  # absolute
        ("offset", pa.int64()),  # byte offset of a shard member's data; -1 for a plain file
        ("size", pa.int64()),  # bytes (the file's, or the member's)
        ("mtime_ns", pa.int64()),
        ("error", pa.string()),
    ]
)
LIST_SUFFIXES = (".txt", ".jsonl", ".parquet")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order within a sample
_GLOB_CHARS = set("*?[")


@dataclass
class Inputs:
    """The inputs of a job, in order, and the folder relative keys are relative to (None for shard keys)."""

    table: pa.Table
    base: str | None

    def __len__(self) -> int:
        return self.table.num_rows


def scan(source: str, *, skip: Path | None = None) -> Inputs:
    """Every input of ``source`` (see the module docstring), in a fixed order. ``skip``: a folder left out
    (the job's own output, when it lies under the source folder)."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            rows = _scan_folder(source, path, skip)
            base = os.getcwd()
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix in LIST_SUFFIXES:
                rows = _scan_list(path)
                base = str(path.resolve().parent)
            elif suffix == ".tar":
                rows, base = _scan_shard(path), None
            else:
                rows, base = [_file_row(source, path)], os.getcwd()
        elif _GLOB_CHARS & set(source) or expand_braces(source) is not None:
            rows, base = _scan_glob(source)
        else:
            raise InputError(f"{source}: no such file or folder, and not a glob pattern")
    except PermissionError as e:
        raise InputError(f"{source}: cannot read ({e.strerror}: {e.filename})") from None
    if not rows:
        raise InputError(f"{source}: no images found")
    return Inputs(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), base)


# ---- folders, globs, single files --------------------------------------------------------------


def _file_row(key: str, path: Path, error: str | None = None) -> dict:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = -1, 0  # reading it will say why
    return {"key": key, "path": str(path.resolve()), "offset": -1, "size": size, "mtime_ns": mtime,
            "error": error}  # fmt: skip


def _scan_folder(source: str, root: Path, skip: Path | None) -> list[dict]:
    skip = skip.resolve() if skip is not None else None
    rows = []

    def fail(e: OSError) -> None:
        raise InputError(f"{e.filename}: cannot list the folder ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or (here / d).resolve() != skip)
        )
        rel = here.relative_to(root).parts
        for name in sorted(filenames):
            if not name.startswith("."):
                rows.append(_file_row(os.path.join(source, *rel, name), here / name))
    return rows


def _scan_glob(pattern: str) -> tuple[list[dict], str | None]:
    patterns = expand_braces(pattern) or [pattern]  # shards-{000..009}.tar: in the range's order
    matches = [m for p in patterns for m in sorted(glob.glob(os.path.expanduser(p), recursive=True))]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
        raise InputError(f"{pattern}: no file matches")
    rows = []
    shards = 0
    for m in matches:
        if m.lower().endswith(".tar"):
            rows += _scan_shard(Path(m))
            shards += 1
        else:
            rows.append(_file_row(m, Path(m)))
    return rows, (None if shards == len(matches) else os.getcwd())


# ---- lists of paths ------------------------------------------------------------------------------


def _scan_list(path: Path) -> list[dict]:
    entries = _list_entries(path)
    folder = path.resolve().parent
    rows = []
    for where, entry in entries:
        if not isinstance(entry, str) or not entry:
            rows.append({"key": str(entry), "path": "", "offset": -1, "size": -1, "mtime_ns": 0,
                         "error": f"{path}:{where}: not a path: {entry!r}"})  # fmt: skip
        else:
            rows.append(_file_row(entry, folder / Path(entry).expanduser()))
    return rows


def _list_entries(path: Path) -> list[tuple[str, object]]:
    """(where, entry) of every listed image: ``where`` names the line or row for messages."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["image"])
        except (OSError, pa.ArrowException, KeyError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{path}: cannot read a column 'image' of paths ({detail})") from None
        return [(f"row {i + 1}", v) for i, v in enumerate(table.column("image").to_pylist())]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the list ({e})") from None
    out: list[tuple[str, object]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or (suffix == ".txt" and line.startswith("#")):
            continue
        if suffix == ".txt":
            out.append((f"line {n}", line))
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{path}:{n}: not a JSON line") from None
        out.append((f"line {n}", record.get("image") if isinstance(record, dict) else record))
    return out


# ---- WebDataset shards ---------------------------------------------------------------------------


def _scan_shard(path: Path) -> list[dict]:
    """One row per sample of a WebDataset shard, in the shard's order: members ``<key>.<ext>`` share a key."""
    shard = str(path.resolve())
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if ext:
                    samples.setdefault(key, {})[ext] = member
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"{path}: not a readable (uncompressed) tar shard ({e})") from None
    rows = []
    for key, members in samples.items():
        member = next((members[e] for e in SHARD_IMAGE_EXTENSIONS if e in members), None)
        if member is None:
            rows.append({"key": key, "path": shard, "offset": -1, "size": -1, "mtime_ns": 0,
                         "error": f"{path}: sample {key} has no {'/'.join(SHARD_IMAGE_EXTENSIONS)} image"})  # fmt: skip
        else:
            rows.append({"key": key, "path": shard, "offset": member.offset_data, "size": member.size,
                         "mtime_ns": int(member.mtime * 1e9), "error": None})  # fmt: skip
    return rows
