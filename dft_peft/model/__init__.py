"""Where a model comes from (local, cache, hub, GGUF), how it loads, its adapter and its shape."""
