"""Shoal: an event-driven service mesh for Python."""

from shoal.errors import ShoalError

__version__ = "0.1.0"
__all__ = ["ShoalError", "__version__"]
