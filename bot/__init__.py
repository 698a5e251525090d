"""lorabot's application: platform adapters, the chat service and the SQLite store.

Never imports torch; the engine owns the model.
"""
