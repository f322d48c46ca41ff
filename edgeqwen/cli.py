"""Command line: argument parsing and printing only; every verb calls a library function.

``EdgeQwenError`` becomes one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
The export verbs import the heavy stack lazily, so ``edgeqwen run`` works on a board with the lean install.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import EdgeQwenError, GenerationError


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def cmd_models(args) -> int:
    from .catalog import DEFAULT_ALIAS, edgeqwen_home, list_models

    entries = list_models()
    if args.json:
        _print_json([{"alias": e.alias, "family": e.family, "arch": e.arch, "params": e.params,
                      "license": e.license, "hub_id": e.hub_id, "sha256": e.sha256, "size": e.size,
                      "offline_mirror": bool(e.mirror)} for e in entries])
        return 0
    print(f"{'alias':32} {'arch':6} {'params':6} {'size':>9}  {'license':11} source")
    for e in entries:
        src = "PyPI mirror (offline)" if e.mirror else e.hub_id
        star = " (default)" if e.alias == DEFAULT_ALIAS else ""
        print(f"{e.alias:32} {e.arch:6} {e.params:6} {e.size / 2**20:7.0f}MB  {e.license:11} {src}{star}")
    print(f"\ncache: {edgeqwen_home()}  (set EDGEQWEN_HOME to move it)")
    print("Also accepted by `edgeqwen export`: a Hugging Face hub id, a local HF folder, a local .gguf file.")
    return 0


def cmd_devices(args) -> int:
    from .profiles import list_profiles, load_profile

    if args.name:
        p = load_profile(args.name)
        _print_json(p.to_dict())
        return 0
    rows = [load_profile(n) for n in list_profiles()]
    if args.json:
        _print_json([r.to_dict() for r in rows])
        return 0
    print(f"{'name':18} {'backend':8} {'prec':5} {'providers':14} {'ctx':>6} {'RAM MB':>7}  description")
    for p in rows:
        print(f"{p.name:18} {p.backend:8} {p.precision:5} {','.join(p.providers):14} {p.context:6d} "
              f"{p.ram_budget_mb:7d}  {p.description[:60]}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    result = export(args.model, args.device, args.output, precision=args.precision, quant_algo=args.quant_algo,
                    block_size=args.block_size, context=args.context, gguf_mode=args.gguf_mode, force=args.force,
                    verify=not args.no_verify, progress=not args.json, threads=args.threads,
                    eight_bit=None if args.eight_bit is None else
                    [] if args.eight_bit.strip().lower() == "none" else args.eight_bit,
                    vocab_refine=args.vocab_refine, vocab_bits=args.vocab_bits, smooth_alpha=args.smooth_alpha,
                    accuracy_level=args.accuracy_level, accuracy_levels=args.layer_accuracy)
    summary = result.summary()
    if args.json:
        _print_json(summary)
    else:
        print(f"bundle: {summary['bundle']}  ({summary['size_mb']} MiB, {summary['precision']}, "
              f"context {summary['context']})")
        ver = summary.get("verification") or {}
        if ver:
            print(f"verification: top-1 agreement {ver['agreement']:.1%}, worst perplexity ratio "
                  f"{ver['worst_perplexity_ratio']:.3f} -> {'passed' if ver['passed'] else 'FAILED'}")
        print(f"next: edgeqwen run {summary['bundle']} \"Write a haiku about the sea\"")
    return 0


def _gen_options(args) -> dict:
    opts: dict[str, Any] = {}
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "seed", "lookup", "enable_thinking"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value
    if args.stop:
        opts["stop"] = args.stop
    if args.stop_token_id:
        opts["stop_token_ids"] = args.stop_token_id
    if args.truncate != "error":
        opts["truncate"] = args.truncate
    return opts


class _ReplyPrinter:
    """Prints a streamed chat reply: Qwen3's thinking (<think>...</think>) dimmed on stderr, the answer on
    stdout, so ``edgeqwen run B "q" > answer.txt`` keeps the answer alone and the terminal still shows both."""

    def __init__(self, *, thinking_open: bool, show_thinking: bool):
        from .runtime.chat import DeltaSplitter

        self.splitter = DeltaSplitter(tools=False, thinking_open=thinking_open)
        self.show_thinking = show_thinking
        self.dim = sys.stderr.isatty()
        self.in_thinking = False

    def feed(self, piece: str) -> None:
        for kind, text in self.splitter.feed(piece):
            self._write(kind, text)

    def finish(self) -> None:
        for kind, text in self.splitter.finish():
            self._write(kind, text)
        self._end_thinking()
        print(flush=True)

    def _write(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            if not self.show_thinking:
                return
            if not self.in_thinking:
                self.in_thinking = True
                sys.stderr.write(("\033[2m" if self.dim else "") + "thinking: ")
            sys.stderr.write(text)
            sys.stderr.flush()
            return
        self._end_thinking()
        print(text, end="", flush=True)

    def _end_thinking(self) -> None:
        if self.in_thinking:
            self.in_thinking = False
            sys.stderr.write(("\033[0m" if self.dim else "") + "\n")
            sys.stderr.flush()


def _opens_thinking(model, messages: list[dict], enable_thinking: bool | None) -> bool:
    """True when the rendered prompt ends inside <think> (thinking-only templates): the reply starts there."""
    try:
        return model.render(messages, enable_thinking=enable_thinking).rstrip().endswith("<think>")
    except EdgeQwenError:
        return False  # the real call reports it


def _print_stats(stats: dict) -> None:
    print(f"\n[ttft {stats['ttft_s'] * 1000:.0f} ms | prefill {stats['prefill_tokens_per_s']:.1f} tok/s | "
          f"decode {stats['decode_tokens_per_s']:.1f} tok/s | {stats['new_tokens']} tokens | "
          f"reused {stats['reused_tokens']} | {_lookup_stats(stats)}peak RSS {stats['peak_rss_mb']:.0f} MB | "
          f"{stats['provider']}]", file=sys.stderr)


def _lookup_stats(stats: dict) -> str:
    drafted = stats.get("lookup_drafted", 0)
    return f"lookup {stats['lookup_accepted']}/{drafted} accepted | " if drafted else ""


def _load(args):
    from . import runtime

    return runtime.load(args.bundle, provider=args.provider, threads=args.threads, context=args.context)


def _read_prompt(prompt: str) -> str:
    """The prompt argument, or standard input for '-' (e.g. `cat notes.txt | edgeqwen run BUNDLE -`)."""
    if prompt != "-":
        return prompt
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"Standard input is not UTF-8 text ({e.reason} at byte {e.start}).",
                              "convert it to UTF-8, e.g. with iconv.") from e
    if not text.strip():
        raise GenerationError("The prompt read from standard input is empty.", "pipe some text into it.")
    return text


def cmd_run(args) -> int:
    args.prompt = _read_prompt(args.prompt)  # before the model loads: a bad input costs nothing
    model = _load(args)
    options = _gen_options(args)
    if args.raw:
        for piece in model.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        printer = _ReplyPrinter(thinking_open=_opens_thinking(model, prompt, args.enable_thinking),
                                show_thinking=not args.hide_thinking)
        for piece in model.stream(prompt, **options):
            printer.feed(piece)
        printer.finish()
    if args.stats and model.last_result is not None:
        _print_stats(model.last_result.stats)
    return 0


CHAT_HELP = "/reset, /system TEXT, /stats, /help, /quit (Ctrl-C stops an answer, Ctrl-D quits)"


def cmd_chat(args) -> int:
    model = _load(args)
    conv = model.chat(system=args.system)
    options = _gen_options(args)
    print(f"edgeqwen chat: {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeDecodeError:
            print("(that line is not UTF-8 text; ignored)", file=sys.stderr)
            continue
        line = line.encode("utf-8", "replace").decode("utf-8")  # undecodable bytes kept as escapes -> '?'
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
            continue
        if command == "/reset":
            conv.reset(args.system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/system" or command.startswith("/system "):
            args.system = command[len("/system"):].strip() or None
            conv.reset(args.system)
            print("(new system prompt; conversation cleared)", file=sys.stderr)
            continue
        if command == "/stats":
            if conv.last is not None:
                _print_stats(conv.last.stats)
            else:
                print("(no answer yet)", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"(unknown command {command.split()[0]}; {CHAT_HELP})", file=sys.stderr)
            continue
        _chat_turn(model, conv, line, options, args)


def _chat_turn(model, conv, line: str, options: dict, args) -> None:
    """One answer. An error or Ctrl-C ends the answer, not the session: the conversation stays usable."""
    thinking_open = _opens_thinking(model, [*conv.messages, {"role": "user", "content": line}],
                                    args.enable_thinking)
    printer = _ReplyPrinter(thinking_open=thinking_open, show_thinking=not args.hide_thinking)
    pieces = conv.stream(line, **options)
    try:
        for piece in pieces:
            printer.feed(piece)
        printer.finish()
    except KeyboardInterrupt:
        pieces.close()  # keeps the part already shown as the assistant's turn
        printer.finish()
        print("(answer stopped)", file=sys.stderr)
        return
    except EdgeQwenError as e:
        printer.finish()
        print(f"edgeqwen: error: {e}", file=sys.stderr)
        return
    if args.stats and conv.last is not None:
        _print_stats(conv.last.stats)


def _progress(enabled: bool, desc: str):
    if not enabled:
        return lambda it: it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # lean runtime install: no bar
        return lambda it: it
    return lambda it: tqdm(it, desc=desc, unit="tok", leave=False)


def _eval_texts(files: list[str] | None) -> dict[str, str]:
    if not files:
        from .export.verify import builtin_texts

        return builtin_texts()
    texts = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise GenerationError(f"Text file {path} does not exist.", "pass an existing UTF-8 text file.")
        try:
            texts[path.stem] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GenerationError(f"{path} is not UTF-8 text ({e.reason}).", "convert it to UTF-8.") from e
    return texts


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate, runtime

    if args.metric == "agreement" and (args.context is not None or args.stride is not None):
        raise GenerationError("--context and --stride apply to `eval perplexity`; `eval agreement` scores each "
                              "text in one window of --max-tokens tokens.",
                              "drop them, or use `eval perplexity --text FILE --reference MODEL`, which also "
                              "reports agreement.")
    model = runtime.load(args.bundle, provider=args.provider, threads=args.threads)
    reference = evaluate.load_reference(args.reference, threads=args.threads) if args.reference else None
    show = not args.json
    if args.metric == "perplexity":
        text = _eval_texts([args.text])[Path(args.text).stem]
        result = evaluate.perplexity(model, text, context=args.context, stride=args.stride, reference=reference,
                                     max_tokens=args.max_tokens, progress=_progress(show, "scoring"))
        out = result.to_dict()
    else:
        if reference is None:
            raise GenerationError("`eval agreement` compares with a reference model.",
                                  "pass --reference MODEL (alias, HF folder or .gguf).")
        texts = _eval_texts(args.text and [args.text])
        out = evaluate.agreement(model, reference, texts, max_tokens=256 if args.max_tokens is None else args.max_tokens,
                                 progress=_progress(show, "scoring"))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        rows = out["texts"].items() if "texts" in out else [(Path(args.text).stem, out)]
        print(f"{'text':16} {'tokens':>7} {'perplexity':>11} {'reference':>10} {'ratio':>7} {'agreement':>9}")
        for name, r in rows:
            ref = "-" if r["reference_perplexity"] is None else f"{r['reference_perplexity']:.3f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            agree = "-" if r["agreement"] is None else f"{r['agreement']:.1%}"
            print(f"{name:16} {r['tokens']:7d} {r['perplexity']:11.3f} {ref:>10} {ratio:>7} {agree:>9}")
        if "texts" in out:
            print(f"overall agreement {out['agreement']:.1%} over {out['tokens']} tokens")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench

    def progress(i: int, runs: int) -> None:
        if not args.json:
            print(f"  {'warm-up' if i == 0 else f'run {i}/{runs}'} done", file=sys.stderr, flush=True)

    r = bench(args.bundle, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
              threads=args.threads, provider=args.provider, progress=progress)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(f"bundle {r.bundle} ({r.size_mb:.0f} MiB) on {r.provider}, {r.threads} threads, load {r.load_s:.2f} s, "
          f"peak RSS {r.peak_rss_mb:.0f} MB")
    print(f"{'test':14} {'median':>10} {'min':>10} {'max':>10}")
    for label, d in ((f"pp{r.prompt_tokens} t/s", r.prefill_tps), (f"tg{r.new_tokens} t/s", r.decode_tps),
                     (f"ttft{r.prompt_tokens} s", r.ttft_s)):
        print(f"{label:14} {d['median']:10.2f} {d['min']:10.2f} {d['max']:10.2f}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .serve import serve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s edgeqwen.serve %(message)s")
    for name, value in (("--port", args.port), ("--max-queue", args.max_queue), ("--max-tokens", args.max_tokens),
                        ("--max-prompt-tokens", args.max_prompt_tokens), ("--max-body-bytes", args.max_body_bytes)):
        if value is not None and (value < (0 if name == "--port" else 1) or (name == "--port" and value > 65535)):
            raise GenerationError(f"{name} must be {'in 0..65535' if name == '--port' else 'a positive integer'}, "
                                  f"got {value}.", f"pass a valid {name}.")
    return serve(args.bundle, provider=args.provider, threads=args.threads, context=args.context,
                 shutdown_timeout=args.shutdown_timeout, host=args.host, port=args.port, api_key=args.api_key,
                 max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, model_name=args.model_name,
                 max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)


def _add_session_args(p: argparse.ArgumentParser) -> None:
    """What ``runtime.load`` takes: shared by run/chat and serve."""
    p.add_argument("bundle", help="bundle folder written by `edgeqwen export`")
    p.add_argument("--provider", default="auto",
                   help="auto | cpu | cuda | dml | coreml | webgpu | xnnpack | nnapi | qnn (default: auto, the "
                        "bundle profile's first provider this onnxruntime build has)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: one per physical core, capped by the profile's threads)")
    p.add_argument("--context", type=int, default=None, help="max context tokens (<= the bundle's)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    _add_session_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default 512, or what the context has left when that is less)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: bundle's config)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="prompt lookup: tokens drafted per step from earlier text, 0 = off (default: 4 on bundles "
                        "where it is cheap: the fast graph, except quantized bundles with float activations on CPU)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, default=None, metavar="ID",
                   help="stop token id, besides the bundle's end tokens (repeatable)")
    p.add_argument("--truncate", choices=["error", "left"], default="error",
                   help="prompt longer than the context allows: 'error' (default) or 'left' (drop the oldest "
                        "tokens)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="enable_thinking", action="store_const", const=True, default=None,
                       help="Qwen3: let the model think before answering (the template's default)")
    think.add_argument("--no-think", dest="enable_thinking", action="store_const", const=False,
                       help="Qwen3: answer without thinking")
    p.add_argument("--hide-thinking", action="store_true",
                   help="do not print the thinking (it goes to stderr, dimmed, by default)")
    p.add_argument("--stats", action="store_true", help="print TTFT, prefill/decode tokens/s and peak memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeqwen", description="Qwen on edge devices: export and run.")
    parser.add_argument("--version", action="version", version=f"edgeqwen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("devices", help="list device profiles, or show one resolved")
    p.add_argument("action", nargs="?", choices=["show"], help="show NAME")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("export", help="export a model into a bundle for a device")
    p.add_argument("model", help="catalog alias, HF hub id, local HF folder, or .gguf file")
    p.add_argument("--device", default="host", help="profile name or path to a .toml (default: host)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--precision", choices=["int4", "int8", "fp16", "fp32"])
    p.add_argument("--quant-algo", choices=["rtn", "k_quant", "hqq", "gptq"])
    p.add_argument("--block-size", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--gguf-mode", choices=["fast", "balanced", "faithful"],
                   help="GGUF sources: 'fast' refits weights to the profile's bits; 'balanced' (int4 default) "
                        "copies the GGUF's own 4-bit tensors exactly (Q4_0/Q4_1/Q4_K: most of a real Q4_K_M file) "
                        "and refits the rest; 'faithful' copies every tensor whose type the kernels can express "
                        "and fits the others at 8 bits")
    p.add_argument("--eight-bit", metavar="PATTERNS",
                   help="int4: comma list of weights kept at 8 bits, replacing the profile's (default "
                        "'attn.,mlp.gate_proj,lm_head,measured', under 450 MB on the 0.5B; adding 'mlp.up_proj': "
                        "most faithful, +7%% bytes; 'lm_head': everything else 4-bit, smaller and faster, less "
                        "faithful; 'none': everything 4-bit, smallest)")
    p.add_argument("--vocab-refine", type=int, metavar="N",
                   help="int4 with an 8-bit lm_head: it reads a 4-bit half and rescores its best N candidates at "
                        "full precision (profile default 128; 0: read the whole matrix every step)")
    p.add_argument("--vocab-bits", type=int, choices=[6, 8],
                   help="int4 with a refined lm_head: bits of the vocabulary matrix (profile default 6: a 4-bit "
                        "half + a 2-bit residual, 34 MB smaller on the 0.5B; 8: most faithful)")
    p.add_argument("--smooth-alpha", type=float, metavar="A",
                   help="int4: SmoothQuant strength moving the attention input's outlier channels into the 8-bit "
                        "q/k/v weights before accuracy level 4 rounds it (profile default 0.5; 0: off)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute precision (profile defaults on CPU: 4 for int4, 0 for int8 and "
                        "--gguf-mode faithful; 4: activations rounded to int8 per block, fastest; 0: float "
                        "activations, the source's arithmetic: int8 from a GGUF gives the float model's tokens, "
                        "at ~0.4x the speed of level 4)")
    p.add_argument("--layer-accuracy", metavar="TYPE=LEVEL,...",
                   help="accuracy level per layer type, over --accuracy-level for those weights (types: attn, mlp, "
                        "qkv_proj, o_proj, gate_proj, up_proj, down_proj, lm_head), e.g. 'down_proj=0' keeps "
                        "float activations where int8 rounding costs the most; the profile's accuracy_levels")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for calibration and verification on this machine (default: every core)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the float source")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="stream an answer to one prompt")
    _add_runtime_args(p)
    p.add_argument("prompt", help="the prompt text, or '-' to read it from standard input")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat (REPL)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a bundle (chat/completions, streaming)")
    _add_session_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or set EDGEQWEN_API_KEY, kept out of `ps`)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait besides the running one")
    p.add_argument("--max-tokens", type=int, default=512, help="default and ceiling for a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (default: context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="refuse larger request bodies (413)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the bundle's source)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let queued requests finish before cancelling them")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="time a bundle: load, TTFT, prefill and decode tokens/s, peak memory")
    p.add_argument("bundle", help="bundle folder written by `edgeqwen export`")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="measured runs after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="perplexity of a bundle on a text, or agreement with a reference model")
    p.add_argument("metric", choices=["perplexity", "agreement"])
    p.add_argument("bundle", help="bundle folder written by `edgeqwen export`")
    p.add_argument("--text", help="UTF-8 text file (perplexity: required; agreement: default built-in texts)")
    p.add_argument("--reference", help="float model to compare with: alias, HF folder or .gguf (needs [export])")
    p.add_argument("--context", type=int, default=None, help="window tokens (default 1024, <= the bundle's)")
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances (default context/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--provider", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON (keys perplexity, reference_perplexity, "
                                                       "ratio, tokens, agreement)")
    p.set_defaults(func=cmd_eval)
    return parser


def _terminated(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "devices" and args.action == "show" and not args.name:
        print("edgeqwen: error: `devices show` needs a profile name.", file=sys.stderr)
        return 2
    if args.command == "eval" and args.metric == "perplexity" and not args.text:
        print("edgeqwen: error: `eval perplexity` needs --text FILE.", file=sys.stderr)
        return 2
    catch_term = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if catch_term:
        # `timeout`, `docker stop`, a cancelled CI job: unwind as on Ctrl-C, so an export removes its temporary
        # folders (`serve` installs its own handler, which drains requests first)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args) or 0
    except EdgeQwenError as e:
        print(f"edgeqwen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nedgeqwen: interrupted", file=sys.stderr)
        return 130
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
