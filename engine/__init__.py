"""lorabot's engine: a list of chat messages in, a fast stream of text out.

Knows nothing of chat platforms or SQLite. Import torch-heavy parts (engine.worker,
engine.loading) only where a model is actually loaded.
"""
