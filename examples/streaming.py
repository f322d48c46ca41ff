"""Stream an answer token by token.  Usage: python streaming.py BUNDLE "your question"

Needs only `pip install edgeqwen` and a bundle folder made by `edgeqwen export`.
"""
import sys

from edgeqwen import runtime

bundle, question = sys.argv[1], " ".join(sys.argv[2:]) or "Explain what a linked list is."
model = runtime.load(bundle)
for piece in model.stream([{"role": "user", "content": question}], max_new_tokens=256):
    print(piece, end="", flush=True)
print()
s = model.last_result.stats
print(f"[{s['decode_tokens_per_s']:.1f} tok/s, first token after {s['ttft_s'] * 1000:.0f} ms]", file=sys.stderr)
