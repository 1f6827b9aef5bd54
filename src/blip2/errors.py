"""Error types: every failure a user can cause is one of these, with a message naming the problem."""

from __future__ import annotations


class Blip2Error(Exception):
    """Base class of every error blip2 raises on purpose."""


class CheckpointError(Blip2Error):
    """A checkpoint is missing, corrupt, incomplete, or not a BLIP-2 checkpoint."""


class ImageError(Blip2Error):
    """An image could not be read: missing, not an image, truncated, or too large."""


class InputError(Blip2Error):
    """A prompt, batch or argument is unusable (empty, too long, wrong type)."""


class DependencyError(Blip2Error):
    """An optional package or a system program that a feature needs is missing (the message says how to
    install it)."""
