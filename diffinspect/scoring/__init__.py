"""Scoring: statistics, calibration, the conformal threshold, the diffusion and COPOD detectors,
features, overlays and loading a detector from a bundle (edge runtime: no torch)."""
