"""compress: find which parts of a trained image classifier do real work, and remove the rest."""

from compress._version import __version__
from compress.analysis import AnalysisConfig, analyze_model, count_noise, find_clusters, load_analysis
from compress.data import load_data
from compress.models import create_model, resolve_taps

__all__ = ["__version__", "AnalysisConfig", "analyze_model", "count_noise", "find_clusters", "load_analysis",
           "load_data", "create_model", "resolve_taps"]
