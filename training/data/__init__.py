"""Dataset readers: alpaca, chat JSONL, Telegram and Discord exports -> conversations.

result = read_dataset(Path("result.json"), persona="Alice")
print(summarize(result))
"""

from training.data.conversation import Conversation, Problem, ReadResult, Turn
from training.data.dataset import read_dataset
from training.data.detect import FORMATS, detect_format
from training.data.summary import summarize

__all__ = [
    "FORMATS",
    "Conversation",
    "Problem",
    "ReadResult",
    "Turn",
    "detect_format",
    "read_dataset",
    "summarize",
]
