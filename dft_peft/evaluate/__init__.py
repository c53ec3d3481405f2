"""Judging data and results: the prior check, inspect, math eval."""
