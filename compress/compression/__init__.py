"""Compression recipes driven by the analysis: AFCC, filter dilution, depth trimming."""
