"""blip2: BLIP-2 written from scratch in PyTorch, loading the released checkpoints.

``import blip2`` is light: the names below import their modules (and torch) when first used, so that a
command that needs no model yet (``blip2 --help``, the start of ``blip2 bulk``) does not wait for torch.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .api import Pipeline, load
    from .errors import Blip2Error, CheckpointError, ImageError, InputError
    from .models.blip2 import Blip2
    from .models.config import Blip2Config

_EXPORTS = {
    "Blip2": ".models.blip2",
    "Blip2Config": ".models.config",
    "Blip2Error": ".errors",
    "CheckpointError": ".errors",
    "ImageError": ".errors",
    "InputError": ".errors",
    "Pipeline": ".api",
    "load": ".api",
}
__all__ = [
    "Blip2",
    "Blip2Config",
    "Blip2Error",
    "CheckpointError",
    "ImageError",
    "InputError",
    "Pipeline",
    "load",
]
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
