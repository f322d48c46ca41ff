"""``pip install edgeqwen`` (no extras) is the runtime a board gets: it must run a bundle without torch,
transformers, optimum, onnx or onnxruntime-genai anywhere in the environment.

Builds a fresh virtual environment (no system site-packages), installs the repository into it from the
package index, and runs a tiny int4 bundle exported by this test process. Takes a minute: marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeqwen import runtime

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "optimum", "onnx", "onnxruntime_genai")
PROMPT = "the quick model runs on a small board"

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import edgeqwen.runtime as rt
    model = rt.load(sys.argv[1], threads=1)
    result = model.generate(sys.argv[2], max_new_tokens=8, stop_token_ids=[])
    # the server is part of the lean install too: one greedy completion over HTTP, standard library only
    import urllib.request
    from edgeqwen.serve import start, stop
    greedy = model.generate(sys.argv[2], max_new_tokens=8, temperature=0).text
    server = start(model, port=0)
    req = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": sys.argv[2], "max_tokens": 8, "temperature": 0}).encode())
    served = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"]
    stop(server, timeout=5)
    heavy = {name: importlib.util.find_spec(name) is not None for name in sys.argv[3].split(",")}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[3].split(","))
    print(json.dumps({"tokens": result.tokens, "text": result.text, "installed": heavy, "loaded": loaded,
                      "served_equals_greedy": served == greedy,
                      "module": rt.__file__}))
""")


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}"
    return proc


@pytest.mark.slow
def test_plain_install_runs_a_bundle_without_the_export_stack(tmp_path: Path, int4_bundle: Path) -> None:
    expected = runtime.load(int4_bundle, threads=1).generate(PROMPT, max_new_tokens=8, stop_token_ids=[])

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # pip builds in the source tree; remove what that build leaves there unless it was there already
    leftovers = [p for p in (REPO / "build", REPO / "edgeqwen.egg-info") if not p.exists()]
    try:
        run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)], cwd=tmp_path)
    finally:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)

    script = tmp_path / "lean_check.py"
    script.write_text(SCRIPT)
    # run from tmp_path so the repository checkout is not on sys.path: the installed package is used
    out = run([str(python), str(script), str(int4_bundle), PROMPT, ",".join(HEAVY)], cwd=tmp_path, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["module"]).is_relative_to(venv), report["module"]
    assert report["installed"] == {name: False for name in HEAVY}
    assert report["loaded"] == []
    assert report["tokens"] == expected.tokens and len(report["tokens"]) > 0
    assert report["text"] == expected.text
    assert report["served_equals_greedy"] is True
