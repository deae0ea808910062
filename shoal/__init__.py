"""Shoal: an event-driven service mesh for Python."""

from typing import Any

from shoal.errors import ShoalError

__version__ = "0.1.0"
__all__ = ["Service", "ShoalError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Service":  # imported on first use: `import shoal` stays light for the CLI
        from shoal.service import Service

        return Service
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
