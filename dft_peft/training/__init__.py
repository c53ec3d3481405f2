"""Run safety and the Trainer's helpers: checkpoints, run identity, divergence, watchdog, distributed, metrics, training arguments."""
