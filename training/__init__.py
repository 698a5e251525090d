"""lorabot's training package: chat logs and instruction data in, LoRA adapters out.

Imports `engine` for model loading and the chat format (so what is trained is exactly
what is served); never imports `bot`.
"""
