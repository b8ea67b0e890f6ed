"""Sensors: sources feed readings into rolling windows; windows answer exact reads."""
