"""blip2: BLIP-2 written from scratch in PyTorch, loading the released checkpoints."""

from .api import Pipeline, load
from .errors import Blip2Error, CheckpointError, ImageError, InputError
from .models.blip2 import Blip2
from .models.config import Blip2Config

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
