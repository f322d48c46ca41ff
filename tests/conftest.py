"""Tiny randomly initialised Qwen models and bundles exported from them, shared by the unit tests.

Everything is built locally (no network): a byte-level BPE tokenizer trained here on a few hundred lines of
English, Chinese and code, and three 2-layer models (Qwen2 tied, Qwen2 untied, Qwen3) with a fixed seed.
Models and bundles are cached on disk so repeated runs take seconds:

* models under ``$EDGEQWEN_TEST_CACHE`` (default ``~/.cache/edgeqwen-tests``) / ``MODELS_VERSION``;
* bundles under the same root, keyed by a hash of the exporter's source code (``edgeqwen/export``,
  ``bundle.py``, ``profiles.py``, ``devices/``) and the installed tool versions, so a change to the export
  code re-exports instead of testing a stale bundle.

A cached item is written under a temporary name and renamed into place when complete, so an interrupted
run never leaves something a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_VERSION = "tiny-models-v1"
ALLOW_ANY_SIZE_ENV = "EDGEQWEN_ALLOW_ANY_SIZE"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # added, but not skipped on decode

# A Qwen-style ChatML template (default system prompt, tools block, thinking switch), enough for the tests.
CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.' }}
{%- endif %}
{%- if tools %}
    {{- '\n\n# Tools\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
    {%- if loop.first and message.role == 'system' %}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()

_ENGLISH = ("the quick model runs on a small board with int4 weights and a fast cache while the user "
            "asks questions about python code and the weather in the city today").split()
_CHINESE = ["你好", "世界", "模型", "运行", "在", "小型", "设备", "上", "量化", "缓存", "速度", "很快", "今天", "天气",
            "我们", "问题", "代码", "中文", "测试"]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "import numpy as np\nx = np.zeros((3, 4))\n",
    "class Box:\n    def __init__(self, size):\n        self.size = size\n",
    "if x > 0 and y < 1:\n    result = {'ok': True}\n",
    "while n:\n    n -= 1  # count down\n",
]


def training_corpus(lines: int = 400) -> list[str]:
    rnd = random.Random(1234)
    out = []
    for i in range(lines):
        kind = i % 3
        if kind == 0:
            out.append(" ".join(rnd.choice(_ENGLISH) for _ in range(rnd.randint(4, 14))) + ".")
        elif kind == 1:
            out.append("".join(rnd.choice(_CHINESE) for _ in range(rnd.randint(3, 10))) + "。")
        else:
            out.append(rnd.choice(_CODE))
    return out


def cache_root() -> Path:
    return Path(os.environ.get("EDGEQWEN_TEST_CACHE") or Path.home() / ".cache" / "edgeqwen-tests")


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text("ok")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first (pytest-xdist); keep theirs
            if not (final / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(folder: Path) -> bool:
    return (folder / ".complete").is_file()


# --------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: Path) -> dict[str, int]:
    """Train the tiny byte-level BPE, pad it to VOCAB_SIZE, save tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + MARKUP_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 32, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    n = tok.get_vocab_size(with_added_tokens=True)
    extra = [AddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(VOCAB_SIZE - n)]
    tok.add_special_tokens(extra)
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    return ids


# --------------------------------------------------------------------------------------------- models

MODEL_KINDS = ("qwen2_tied", "qwen2_untied", "qwen3")


def build_model(kind: str, folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    ids = build_tokenizer(folder)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
                  initializer_range=0.2, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=kind != "qwen2_untied")
    seed = {"qwen2_tied": 11, "qwen2_untied": 22, "qwen3": 33}[kind]
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # random biases and norm gains, so the q/k/v bias and norm paths really count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(str(folder))
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def tiny_model(kind: str) -> Path:
    folder = cache_root() / MODELS_VERSION / kind
    if not _cached(folder):
        with _building(folder) as tmp:
            build_model(kind, tmp)
    return folder


# --------------------------------------------------------------------------------------------- bundles


@contextlib.contextmanager
def allow_any_size() -> Iterator[None]:
    """Let the tiny models through the size check for the duration of the block only.

    Not set for the whole session: tests/test_sources.py checks that tiny models are refused by default.
    """
    old = os.environ.get(ALLOW_ANY_SIZE_ENV)
    os.environ[ALLOW_ANY_SIZE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ALLOW_ANY_SIZE_ENV]
        else:
            os.environ[ALLOW_ANY_SIZE_ENV] = old


PORTABLE_DEVICE = "apple-silicon"  # a portable-backend profile; on this machine it runs on the CPU provider


def exporter_fingerprint() -> str:
    h = hashlib.sha256(MODELS_VERSION.encode())
    sources = sorted((REPO / "edgeqwen" / "export").glob("*.py")) + sorted((REPO / "devices").glob("*.toml"))
    sources += sorted((REPO / "edgeqwen" / "data").glob("*.txt"))  # calibration text
    sources += [REPO / "edgeqwen" / name for name in ("bundle.py", "profiles.py", "hostinfo.py", "__init__.py")]
    for path in sources:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for pkg in ("onnxruntime-genai", "onnx", "onnxruntime", "transformers", "torch"):
        h.update(f"{pkg}={version(pkg)}".encode())
    return h.hexdigest()[:16]


def export_bundle(kind: str, precision: str, device: str = "host") -> Path:
    """A cached bundle of a tiny model; ``device`` picks the profile (and so the backend)."""
    from edgeqwen.export import export

    suffix = "" if device == "host" else f"-{device}"
    folder = cache_root() / f"bundles-{exporter_fingerprint()}" / f"{kind}-{precision}{suffix}"
    if not _cached(folder):
        source = tiny_model(kind)
        with _building(folder) as tmp, allow_any_size():
            export(str(source), device, tmp / "bundle", precision=precision, verify=False, progress=False,
                   force=True)
    return folder / "bundle"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """kind -> HF folder of that tiny model."""
    return {kind: tiny_model(kind) for kind in MODEL_KINDS}


@pytest.fixture(scope="session")
def qwen2_tied(tiny_models) -> Path:
    return tiny_models["qwen2_tied"]


@pytest.fixture(scope="session")
def qwen2_untied(tiny_models) -> Path:
    return tiny_models["qwen2_untied"]


@pytest.fixture(scope="session")
def qwen3(tiny_models) -> Path:
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def fp32_bundles(tiny_models) -> dict[str, Path]:
    """kind -> fp32 bundle of that tiny model (the reference-equality tests run these)."""
    return {kind: export_bundle(kind, "fp32") for kind in MODEL_KINDS}


@pytest.fixture(scope="session")
def portable_fp32_bundles(tiny_models) -> dict[str, Path]:
    """kind -> fp32 bundle of the portable (standard-op, Optimum-exported) graph."""
    return {kind: export_bundle(kind, "fp32", PORTABLE_DEVICE) for kind in MODEL_KINDS}


@pytest.fixture(scope="session")
def portable_int8_bundles(tiny_models) -> dict[str, Path]:
    return {kind: export_bundle(kind, "int8", PORTABLE_DEVICE) for kind in MODEL_KINDS}


@pytest.fixture(scope="session")
def int4_bundle(tiny_models) -> Path:
    return export_bundle("qwen2_untied", "int4")


@pytest.fixture(scope="session")
def int8_bundle(tiny_models) -> Path:
    return export_bundle("qwen2_untied", "int8")


@pytest.fixture(scope="session")
def int4_tied_bundle(tiny_models) -> Path:
    """int4 of the tied model: embedding and lm_head share one quantized matrix."""
    return export_bundle("qwen2_tied", "int4")


@pytest.fixture
def allow_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that call export() themselves."""
    monkeypatch.setenv(ALLOW_ANY_SIZE_ENV, "1")


@pytest.fixture
def bundle_copy(tmp_path: Path):
    """Copy a cached bundle into tmp_path before a test modifies it."""

    def copy(bundle: Path, name: str = "bundle") -> Path:
        dest = tmp_path / name
        shutil.copytree(bundle, dest)
        return dest

    return copy
