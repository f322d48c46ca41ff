"""A minimal terminal chat that keeps the KV cache between turns.  Usage: python chat.py BUNDLE

Each turn prefills only the new message: the conversation's earlier tokens are reused from the cache.
"""
import sys

from edgeqwen import runtime

model = runtime.load(sys.argv[1])
chat = model.chat(system="You are a helpful assistant. Keep answers short.")
while True:
    try:
        text = input("you> ")
    except (EOFError, KeyboardInterrupt):
        break
    if not text.strip():
        continue
    print("qwen> ", end="")
    for piece in chat.stream(text, max_new_tokens=300):
        print(piece, end="", flush=True)
    print(f"\n      ({chat.last.stats['reused_tokens']} prompt tokens reused from the cache)")
