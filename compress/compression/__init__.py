"""Compression recipes driven by the analysis: AFCC, filter dilution, depth trimming."""

from compress.compression import afcc  # noqa: F401
from compress.compression import dilute  # noqa: F401
from compress.compression import trim  # noqa: F401
from compress.compression import blocks  # noqa: F401
