"""Edit a source file with the model, and see what prompt lookup does for it.

Usage: python code_edit.py BUNDLE FILE.py ["what to change"]

An edit's answer mostly repeats the file, so the runtime's prompt lookup (on by default) drafts those
tokens from the prompt and checks several per step. The script answers twice, with lookup off and on, and
prints both speeds: greedy, so the text is usually the same (int4 bundles round a multi-token run slightly
differently at near-ties), and the second is faster where lookup is on by default (fast int4 bundles; int8,
"faithful" and portable bundles leave it off, so there both runs are alike). Needs only `pip install edgeqwen`
and a bundle folder made by `edgeqwen export`.
"""
import sys
from pathlib import Path

from edgeqwen import runtime

bundle, path = sys.argv[1], Path(sys.argv[2])
task = " ".join(sys.argv[3:]) or "Add type hints and a one-line docstring to every function."
model = runtime.load(bundle)
# the answer repeats the file, so give it as many tokens as the file has, and keep both inside the context
# (2,048 tokens on the rpi4 and android-arm64 profiles); a small model also edits short files better
budget = min(1500, (model.context - 128) // 2)
source_ids = model.encode(path.read_text(encoding="utf-8"))
source = model.decode(source_ids[:budget])
if len(source_ids) > budget:
    print(f"[file cut to its first {budget} of {len(source_ids)} tokens]", file=sys.stderr)
new_tokens = min(1024, model.context - budget - 128)
messages = [{"role": "user", "content": f"{task} Reply with the whole file in one code block.\n\n"
             f"```python\n{source}\n```"}]
plain = model.generate(messages, max_new_tokens=new_tokens, temperature=0, lookup=0)
for piece in model.stream(messages, max_new_tokens=new_tokens, temperature=0):  # lookup on (the default)
    print(piece, end="", flush=True)
print()
fast = model.last_result.stats
print(f"[lookup off: {plain.stats['decode_tokens_per_s']:.1f} tok/s | lookup on: "
      f"{fast['decode_tokens_per_s']:.1f} tok/s, {fast['lookup_accepted']} of {fast['lookup_drafted']} drafted "
      f"tokens accepted | same text: {model.last_result.text == plain.text}]", file=sys.stderr)
