"""Moved to `pipeline.engines.driver`; this name keeps working."""

from .engines.driver import *  # noqa: F403
from .engines.driver import __all__  # noqa: F401
