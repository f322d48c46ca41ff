"""A minimal terminal chat that keeps the KV cache between turns.  Usage: python chat.py BUNDLE

Each turn prefills only the new message: the conversation's earlier tokens are reused from the cache.
Answers stop at 512 tokens or where the context runs out; a conversation that fills the context is
started over (a real app might summarise it, or pass truncate="left" to drop the oldest tokens).
"""
import sys

from edgeqwen import runtime
from edgeqwen.errors import ContextOverflowError

SYSTEM = "You are a helpful assistant. Keep answers short."
model = runtime.load(sys.argv[1])
chat = model.chat(system=SYSTEM)
while True:
    try:
        text = input("you> ")
    except (EOFError, KeyboardInterrupt):
        break
    if not text.strip():
        continue
    try:
        print("qwen> ", end="")
        for piece in chat.stream(text):
            print(piece, end="", flush=True)
    except ContextOverflowError:
        print("(the conversation filled the context; starting a new one: ask again)")
        chat.reset(SYSTEM)
        continue
    print(f"\n      ({chat.last.stats['reused_tokens']} prompt tokens reused from the cache)")
