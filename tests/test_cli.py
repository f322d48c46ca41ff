"""cli.py's runtime verbs: the chat REPL (commands, errors and Ctrl-C end a turn, not the session), the reply
printer (Qwen3 thinking apart from the answer), and the examples/ scripts run against a tiny bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeqwen import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_chat(monkeypatch, capsys, bundle: Path, lines: list[str], *extra: str) -> tuple[int, str, str]:
    feed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code = cli.main(["chat", str(bundle), "--threads", "1", "--temperature", "0", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_commands(monkeypatch, capsys, fp32_bundles) -> None:
    code, out, err = run_chat(monkeypatch, capsys, fp32_bundles["qwen3"],
                              ["/help", "/stats", "hello there", "/stats", "/system be brief", "/bogus", "hi",
                               "/reset", "/quit", "never read"], "--max-new-tokens", "6")
    assert code == 0
    assert err.count("/reset, /system TEXT, /stats, /help, /quit") == 3  # banner, /help, unknown command
    assert "(no answer yet)" in err and "(unknown command /bogus;" in err
    assert "(new system prompt; conversation cleared)" in err and "(conversation cleared)" in err
    assert err.count("decode") == 1 and "tok/s" in err  # the one /stats after an answer
    assert out.count("\n") >= 2  # two answers


def test_chat_survives_an_error_and_ctrl_c(monkeypatch, capsys, fp32_bundles) -> None:
    calls = {"n": 0}
    real_feed = cli._ReplyPrinter.feed

    def feed(self, piece: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user stops the first answer after its third piece
        real_feed(self, piece)

    monkeypatch.setattr(cli._ReplyPrinter, "feed", feed)
    long_question = " ".join(["the quick model runs on a small board"] * 20)
    code, out, err = run_chat(monkeypatch, capsys, fp32_bundles["qwen3"],
                              ["hello", long_question, "short again", "/stats"],
                              "--context", "64")
    assert code == 0
    assert "(answer stopped)" in err
    assert "edgeqwen: error: The prompt (" in err and "fills the context (64)" in err and "/reset" in err
    assert err.count("decode") == 1  # the third turn answered and /stats reports it


def test_chat_survives_input_that_is_not_utf8(monkeypatch, capsys, fp32_bundles) -> None:
    """A Latin-1 byte on a UTF-8 terminal (input() raises), or kept as an escape in a C locale (a surrogate)."""
    lines = iter(["caf\udce9 au lait", None, "/stats"])

    def fake_input(prompt: str = "") -> str:
        try:
            line = next(lines)
        except StopIteration:
            raise EOFError from None
        if line is None:
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    code = cli.main(["chat", str(fp32_bundles["qwen3"]), "--threads", "1", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0
    assert "(that line is not UTF-8 text; ignored)" in err
    assert err.count("decode") == 1  # the first line was answered (with '?' for the stray byte)


def test_serve_refuses_a_port_above_65535(capsys, fp32_bundles) -> None:
    assert cli.main(["serve", str(fp32_bundles["qwen3"]), "--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err


def test_reply_printer_shows_thinking_apart_from_the_answer(capsys) -> None:
    printer = cli._ReplyPrinter(thinking_open=False, show_thinking=True)
    for piece in ["<th", "ink>\nweigh", " it</thi", "nk>\n\nThe answer", " is 4."]:
        printer.feed(piece)
    printer.finish()
    out = capsys.readouterr()
    assert out.out == "The answer is 4.\n"
    assert out.err == "thinking: weigh it\n"
    hidden = cli._ReplyPrinter(thinking_open=True, show_thinking=False)  # the template opened <think>
    for piece in ["hmm", "</think>", "Yes."]:
        hidden.feed(piece)
    hidden.finish()
    out = capsys.readouterr()
    assert out.out == "Yes.\n" and out.err == ""


def test_run_refuses_thinking_options_on_a_raw_prompt(capsys, fp32_bundles) -> None:
    assert cli.main(["run", str(fp32_bundles["qwen3"]), "hi", "--raw", "--no-think"]) == 2
    assert "enable_thinking only applies to chat messages" in capsys.readouterr().err


def test_run_reads_the_prompt_from_stdin(fp32_bundles) -> None:
    """`edgeqwen run BUNDLE -` answers what is piped in, the same as the prompt given as an argument."""
    bundle, prompt = str(fp32_bundles["qwen3"]), "def add(a, b):\n    return"
    base = [sys.executable, "-m", "edgeqwen.cli", "run", bundle, "--raw", "--temperature", "0",
            "--max-new-tokens", "8", "--threads", "1"]
    given = subprocess.run(base[:5] + [prompt] + base[5:], capture_output=True, text=True, timeout=120)
    piped = subprocess.run(base[:5] + ["-"] + base[5:], input=prompt, capture_output=True, text=True, timeout=120)
    assert given.returncode == piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and given.stdout.strip()
    bad = subprocess.run(base[:5] + ["-"] + base[5:], input=b"caf\xe9", capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"Standard input is not UTF-8 text" in bad.stderr
    empty = subprocess.run(base[:5] + ["-"] + base[5:], input="  \n", capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "read from standard input is empty" in empty.stderr


@pytest.mark.parametrize(("script", "args", "stdin"), [
    ("streaming.py", ["What is a mutex?"], ""),
    ("chat.py", [], "hello\nand then?\nmore\n"),
    ("tool_calling.py", [], ""),
])
def test_examples_run_on_a_tiny_bundle(fp32_bundles, script: str, args: list[str], stdin: str) -> None:
    """Random weights write nonsense, so this checks that the scripts run to the end (a full context, odd
    replies and all); tests/e2e runs them on the real model."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), str(fp32_bundles["qwen3"]), *args],
                          input=stdin, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
