"""Fitting in GPU memory: the planner (formulas), the rehearsal (the real step on meta), offloaded checkpointing, tiled MLP."""
