"""The method's phases 2 and 3: probes per tap, per-filter field matrices, clusters, noise and SNR."""

from compress.analysis.clusters import count_noise, find_clusters, find_clusters_batched, noise_batched
from compress.analysis.engine import AnalysisConfig, analyze_model, analyze_tap
from compress.analysis.fields import clip_fields, field_matrices, normalize_fields
from compress.analysis.result import AnalysisResult, LayerStats, TapAnalysis, load_analysis
from compress.analysis.stats import find_plateau, label_snr, layer_stats, snr_estimates

__all__ = ["count_noise", "find_clusters", "find_clusters_batched", "noise_batched", "AnalysisConfig",
           "analyze_model", "analyze_tap", "clip_fields", "field_matrices", "normalize_fields", "AnalysisResult",
           "LayerStats", "TapAnalysis", "load_analysis", "find_plateau", "label_snr", "layer_stats", "snr_estimates"]
