"""A scripted three-turn conversation, printing how much of each prompt came from the KV cache.

Usage: python multi_turn.py BUNDLE
"""
import sys

from edgeqwen import runtime

model = runtime.load(sys.argv[1])
chat = model.chat(system="You are a concise Python tutor.")
for question in ["What is a list comprehension?", "Show one that squares even numbers.",
                 "Rewrite it as a generator expression."]:
    result = chat.send(question, max_new_tokens=160, temperature=0)
    st = result.stats
    print(f"## {question}\n{result.text}\n")
    print(f"   prompt {st['prompt_tokens']} tokens, {st['reused_tokens']} reused, "
          f"ttft {st['ttft_s'] * 1000:.0f} ms, {st['decode_tokens_per_s']:.1f} tok/s\n")
