"""``compress optimize``: a latency budget ("twice as fast, at most 1 point lost, on this CPU") met
by the toolkit itself, from candidates the analysis suggests, timed on this machine.

:class:`OptimizeConfig` (the settings) imports little; :func:`optimize` loads the search on first use."""

from typing import Any

from compress.optimize.config import OptimizeConfig

__all__ = ["OptimizeConfig", "optimize"]


def __getattr__(name: str) -> Any:
    if name == "optimize":
        from compress.optimize.search import optimize

        return optimize
    raise AttributeError(f"module 'compress.optimize' has no attribute {name!r}")
