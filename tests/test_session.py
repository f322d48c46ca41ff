"""runtime/session.py: provider choice and fallback, and giving back the weight pages onnxruntime no longer reads."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeqwen import runtime
from edgeqwen.errors import ProviderError
from edgeqwen.runtime import session
from edgeqwen.runtime.session import choose_provider, release_weight_pages

GPU_PROFILE = {"providers": ["cuda", "dml", "cpu"]}


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_auto_takes_the_profiles_first_available_provider(monkeypatch) -> None:
    monkeypatch.setattr(session.ort, "get_available_providers",
                        lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert choose_provider("auto", GPU_PROFILE, "fast") == "dml"  # cuda is first but absent
    with pytest.warns(RuntimeWarning, match=r"CoreMLExecutionProvider, this bundle's first choice, is not "
                                            r"in this onnxruntime build; running on CPU \(install onnxruntime"):
        assert choose_provider("auto", {"providers": ["coreml", "cpu"]}, "portable") == "cpu"


def test_auto_on_a_cpu_profile_is_silent(cpu_only, recwarn) -> None:
    assert choose_provider("auto", {"providers": ["cpu"]}, "fast") == "cpu"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_default_threads_are_the_profiles_capped_by_this_machines_cores(monkeypatch) -> None:
    from edgeqwen.hostinfo import HostInfo

    host = HostInfo(arch="x86_64", cpu_model="test", isa=(), cores=4, ram_mb=8000, os="Linux")
    monkeypatch.setattr(session, "detect_host", lambda: host)
    assert session.default_threads({"threads": 0}) == 4  # 0: one per physical core
    assert session.default_threads({}) == 4
    assert session.default_threads({"threads": 2}) == 2
    assert session.default_threads({"threads": 16}) == 4  # a bundle tuned on a bigger machine


def test_a_missing_provider_falls_back_to_cpu_naming_the_package(cpu_only) -> None:
    with pytest.warns(RuntimeWarning, match=r"CUDAExecutionProvider is not in this onnxruntime build.*"
                                            r"install onnxruntime-gpu"):
        assert choose_provider("cuda", GPU_PROFILE, "fast") == "cpu"
    with pytest.warns(RuntimeWarning, match="onnxruntime-directml"):
        assert choose_provider("DmlExecutionProvider", GPU_PROFILE, "fast") == "cpu"  # full names work too


def test_a_graph_the_provider_cannot_run_is_refused_with_the_reason(cpu_only) -> None:
    with pytest.raises(ProviderError, match="contrib ops") as exc:
        choose_provider("coreml", {"providers": ["coreml"]}, "fast")
    assert "portable profile" in exc.value.fix
    with pytest.raises(ProviderError, match="Unknown execution provider 'tpu'"):
        choose_provider("tpu", GPU_PROFILE, "fast")


def _rss_kb(address: int) -> int:
    """Resident kB of the mapping that starts at ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = int(head[0].split("-")[0], 16) == address
            elif inside and head[0] == "Rss:":
                return int(head[1])
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_drops_clean_weight_pages_and_keeps_written_ones(tmp_path: Path) -> None:
    """onnxruntime maps external weights private and writable: a mapping it never wrote is only file pages
    (released, and still reads the same), one holding a copied-on-write page is its data (left alone)."""
    size = 4 << 20
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data.tobytes())
    other = tmp_path / "other.data"
    other.write_bytes(data.tobytes())
    with open(path, "r+b") as f, open(other, "r+b") as g:
        clean = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        written = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        unrelated = mmap.mmap(g.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    views = [np.frombuffer(m, dtype=np.uint8) for m in (clean, written, unrelated)]
    for v in views:
        assert np.array_equal(v, data)  # reads (faults in) every page, and the mappings hold the file's bytes
    views[1][5] = data[5] ^ 0xFF  # a copied-on-write page
    addresses = [v.ctypes.data for v in views]
    before = [_rss_kb(a) for a in addresses]
    assert before[0] >= size // 1024 * 9 // 10 and before[1] > 0

    released = release_weight_pages([path])

    assert released == size  # the clean mapping only
    after = [_rss_kb(a) for a in addresses]
    assert after[0] == 0
    assert after[1] == before[1] and after[2] == before[2]
    assert np.array_equal(views[0], data)  # faults back in from the file, unchanged
    assert views[1][5] == data[5] ^ 0xFF  # the written page survived
    del views, v
    for m in (clean, written, unrelated):
        m.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_without_matching_mappings_is_a_no_op(tmp_path: Path) -> None:
    assert release_weight_pages([tmp_path / "absent.data"]) == 0
    assert release_weight_pages([]) == 0


def test_generation_after_the_release_equals_a_fresh_load(int4_bundle: Path) -> None:
    """The runtime releases pages at load; a second release mid-conversation changes no token either."""
    model = runtime.load(int4_bundle, provider="cpu")
    if sys.platform.startswith("linux"):
        assert model.released_bytes > 0  # onnxruntime mapped the external weights and the load released some
    first = model.generate("1, 2, 3,", max_new_tokens=24, temperature=0)
    release_weight_pages([int4_bundle / "model.onnx.data"])
    model.reset()
    again = model.generate("1, 2, 3,", max_new_tokens=24, temperature=0)
    assert again.tokens == first.tokens and len(first.tokens) >= 8, first.tokens
