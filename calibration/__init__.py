"""Calibration: data, model runs and attention profiles."""
