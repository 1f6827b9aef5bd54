"""blip2: BLIP-2 written from scratch in PyTorch, loading the released checkpoints."""

from .api import Pipeline, load
from .config import Blip2Config
from .errors import Blip2Error, CheckpointError, ImageError, InputError
from .model import Blip2

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
