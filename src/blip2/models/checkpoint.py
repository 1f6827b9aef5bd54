"""Finding a checkpoint: a local folder in the hub layout, one shipped in the package (``demo``), or a
hub id fetched through ``huggingface_hub``. Light (no torch): ``blip2 bulk`` resolves the checkpoint
before its decode processes start, and they start before torch is imported."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# Checkpoints shipped inside the package, loaded by name and offline (see ``blip2.demo``). A local folder
# of the same name that holds a checkpoint wins.
NAMED_CHECKPOINTS = {"demo": "demo/checkpoints/demo", "demo-itm": "demo/checkpoints/demo-itm"}
# The retrieval sibling (its stage-1 model) of a shipped generation checkpoint: what `blip2 index/search` load.
RETRIEVAL_SIBLINGS = {"demo": "demo-itm"}


def retrieval_checkpoint(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """The checkpoint retrieval should load for ``name_or_path``: a shipped sibling, else the same."""
    return RETRIEVAL_SIBLINGS.get(str(name_or_path), name_or_path)


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder, a checkpoint shipped in the package (``demo``), or a hub id fetched
    through (and cached by) ``huggingface_hub``."""
    path = Path(name_or_path).expanduser()
    named = NAMED_CHECKPOINTS.get(str(name_or_path))
    if named is not None and not (path / "config.json").is_file():
        folder = Path(__file__).parent.parent / named
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder}: the shipped {name_or_path!r} checkpoint is missing from this install"
            )
        return folder
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path}: no config.json; this folder is not a checkpoint in the hub layout"
            )
        return path
    if path.exists():
        raise CheckpointError(
            f"{path}: a checkpoint is a folder (config.json, weights, tokenizer), not a file"
        )
    name = str(name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"{name}: no such folder, and not a hub model id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is not installed; pass a local checkpoint folder") from None

    def fetch(patterns: list[str], local_only: bool) -> Path:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only))

    try:
        folder = fetch(HUB_PATTERNS, local_only=True)
    except Exception:  # noqa: BLE001 - not (fully) in the cache
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        if _hub_offline():
            raise CheckpointError(
                f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. Download it where "
                f"there is network (`hf download {name}`) and copy the cache "
                "(~/.cache/huggingface), or pass a local checkpoint folder."
            )
        log.info("downloading %s from the Hugging Face hub", name)
        try:
            folder = fetch(HUB_PATTERNS, local_only=False)
        except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end here
            raise CheckpointError(
                f"cannot fetch {name} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                f"Offline? Download it where there is network (`hf download {name}`) and copy "
                "the cache (~/.cache/huggingface), or pass a local checkpoint folder."
            ) from None
    if not any(folder.glob("*.safetensors")):
        # an older repo with only PyTorch pickles; weight_files() reports it if this fails too
        with contextlib.suppress(Exception):
            folder = fetch(["*.bin", "*.bin.index.json"], local_only=_hub_offline())
    return folder
