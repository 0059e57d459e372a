"""Dose evaluation: DVHs, benchmark scores, the clinical scorecard."""
