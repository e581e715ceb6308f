"""Published settings of the analytical models (plain tables in :mod:`.published`)."""
from . import published

__all__ = ["published"]
