"""gpuboss: the boss service beside Redis (HTTP API, status, reaper). See the README."""

from gpuboss_client import __version__

__all__ = ["__version__"]
