"""Device profiles: every builtin loads and round-trips, bad input gets a message that names the fix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from edgeqwen.errors import ProfileError
from edgeqwen.hostinfo import parse_cpuinfo
from edgeqwen.profiles import (
    PROFILE_KEYS,
    PROVIDER_NAMES,
    PROVIDER_PACKAGES,
    Profile,
    check_memory_budget,
    detect_host,
    kv_cache_bytes,
    list_profiles,
    load_profile,
    resolve_host_profile,
    with_overrides,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEVICES = Path(__file__).resolve().parent.parent / "devices"
EXPECTED = {"host", "rpi5", "rpi4", "jetson-orin-nano", "x86-avx2", "x86-avx512", "apple-silicon",
            "windows-dml", "android-arm64", "cuda"}

MB = 1024 * 1024


def write(tmp_path: Path, text: str, name: str = "mydev.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- builtins


def test_list_profiles_is_sorted_and_complete():
    names = list_profiles()
    assert names == sorted(names)
    assert EXPECTED <= set(names)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_loads_and_round_trips(name):
    prof = load_profile(name)
    assert prof.name == name
    assert prof.source == f"builtin:{name}"
    assert prof.description
    assert prof.ort_providers()[-1] == "CPUExecutionProvider"  # every profile can fall back to CPU
    data = json.loads(json.dumps(prof.to_dict()))  # must be JSON-ready
    assert Profile.from_dict(data) == prof


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_files_spell_out_every_key(name):
    """Builtins are documentation too: no key should silently come from a dataclass default."""
    raw = tomllib.loads((DEVICES / f"{name}.toml").read_text(encoding="utf-8"))
    assert raw["name"] == name
    assert set(PROFILE_KEYS) - {"provider_options"} <= set(raw)


def test_specific_builtin_choices():
    assert load_profile("rpi4").context == 2048 and load_profile("rpi4").precision == "int4"
    jetson = load_profile("jetson-orin-nano")
    assert jetson.ort_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert jetson.io_dtype == "fp16"
    apple = load_profile("apple-silicon")
    assert (apple.backend, apple.precision, apple.providers[0]) == ("portable", "int8", "coreml")
    assert load_profile("android-arm64").providers == ("nnapi", "cpu")
    cuda = load_profile("cuda")
    assert "cuda" in cuda.provider_options and cuda.accuracy_level == 0 and cuda.context == 8192


def test_provider_tables_cover_the_same_names():
    assert set(PROVIDER_NAMES) == set(PROVIDER_PACKAGES)
    assert PROVIDER_PACKAGES["cuda"] == "onnxruntime-gpu"
    assert PROVIDER_NAMES["qnn"] == "QNNExecutionProvider"


def test_ort_provider_options_are_strings_aligned_with_providers():
    prof = Profile(name="t", providers=("cuda", "cpu"), io_dtype="fp16",
                   provider_options={"cuda": {"device_id": 0, "enable_cuda_graph": True}})
    assert prof.ort_provider_options() == [{"device_id": "0", "enable_cuda_graph": "1"}, {}]


# ---- host


def test_host_profile_has_machine_facts():
    host = detect_host()
    assert host.cores >= 1 and host.ram_mb > 0 and host.arch and host.os
    prof = resolve_host_profile()
    assert prof.threads == host.cores
    assert 256 <= prof.ram_budget_mb <= max(256, host.ram_mb)
    assert prof.precision == "int4" and prof.accuracy_level == 4
    assert host.cpu_model in prof.description
    data = prof.to_dict()
    assert data["host"]["cores"] == host.cores and data["host"]["ram_mb"] == host.ram_mb
    assert Profile.from_dict(json.loads(json.dumps(data))).host == host


def test_host_overrides_win_over_detection():
    prof = load_profile("host", threads=1, ram_budget_mb=512)
    assert (prof.threads, prof.ram_budget_mb) == (1, 512)


def test_parse_cpuinfo_raspberry_pi_and_x86():
    rpi = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
           "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n\n"
           "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    model, isa, cores = parse_cpuinfo(rpi)
    assert model == "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)"
    assert isa == ("neon", "asimddp", "fp16") and cores == 0
    x86 = "".join(f"processor\t: {i}\nmodel name\t: Some CPU\nphysical id\t: 0\ncore id\t\t: {i // 2}\n"
                  "flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512_vnni\n\n" for i in range(8))
    model, isa, cores = parse_cpuinfo(x86)
    assert (model, cores) == ("Some CPU", 4)
    assert isa == ("avx", "avx2", "fma", "f16c", "avx512f", "avx512vnni")


# ---- validation


def test_unknown_key_names_it_and_lists_allowed(tmp_path):
    path = write(tmp_path, 'name = "x"\nprecison = "int4"\n')
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    msg = str(exc.value)
    assert "'precison'" in msg and "did you mean 'precision'" in msg
    for key in PROFILE_KEYS:
        assert key in msg


@pytest.mark.parametrize("key,value,allowed", [
    ("precision", "int3", ["int4", "int8", "fp16", "fp32"]),
    ("backend", "x", ["fast", "portable"]),
    ("block_size", 48, ["16", "32", "64", "128", "256"]),
    ("block_size_8bit", 100, ["16", "32", "64", "128", "256"]),
    ("providers", ["tpu"], ["cpu", "cuda", "qnn"]),
    ("providers", [["cpu"]], ["cpu", "cuda", "qnn"]),
    ("providers", [{"a": 1}], ["cpu", "cuda", "qnn"]),
    ("context", 100, ["256", "131072"]),
    ("accuracy_level", 7, ["0", "4"]),
    ("exact_accuracy_level", -1, ["0", "4"]),
    ("eight_bit", ["mlp.gate"], ["measured", "attn.", "mlp.gate_proj", "layers.N."]),
    ("vocab_refine", -1, ["0", "1024"]),
    ("vocab_refine", 5000, ["0", "1024"]),
    ("vocab_bits", 4, ["6", "8"]),
    ("smooth_alpha", 1.5, ["0", "1"]),
    ("smooth_alpha", "strong", ["0", "1"]),
])
def test_bad_value_names_value_and_allowed(key, value, allowed):
    with pytest.raises(ProfileError) as exc:
        load_profile("rpi5", **{key: value})
    msg = str(exc.value)
    assert f"'{key}'" in msg
    assert repr(value if not isinstance(value, list) else value[0]) in msg
    for word in allowed:
        assert word in msg


def test_eight_bit_patterns_are_normalised_and_recorded():
    prof = load_profile("rpi5", eight_bit="attn., layers.23.mlp., attn.")
    assert prof.eight_bit == ("attn.", "layers.23.mlp.")
    assert prof.to_dict()["eight_bit"] == ["attn.", "layers.23.mlp."]
    assert load_profile("rpi5").eight_bit == ("attn.", "mlp.gate_proj", "lm_head", "measured")  # measured default
    assert load_profile("rpi5", eight_bit=["measured"]).eight_bit == ("measured",)


def test_negative_threads_and_tiny_budget_refused():
    with pytest.raises(ProfileError, match="threads"):
        load_profile("rpi5", threads=-1)
    with pytest.raises(ProfileError, match="ram_budget_mb"):
        load_profile("rpi5", ram_budget_mb=100)


def test_portable_int4_refused_with_fix():
    with pytest.raises(ProfileError) as exc:
        load_profile("apple-silicon", precision="int4")
    assert "portable" in str(exc.value) and "int8" in exc.value.fix


def test_fp16_precision_needs_fp16_io_on_the_fast_backend():
    """The builder's float graph follows io_dtype: fp16 with fp32 I/O wrote fp32 weights labelled fp16."""
    with pytest.raises(ProfileError, match="precision = 'fp16' with io_dtype = 'fp32'") as exc:
        load_profile("rpi5", precision="fp16")
    assert "int4, int8, fp32" in str(exc.value) and "cuda" in str(exc.value)
    assert load_profile("cuda", precision="fp16").precision == "fp16"


def test_fp16_io_on_cpu_first_refused():
    with pytest.raises(ProfileError, match="io_dtype") as exc:
        load_profile("rpi5", io_dtype="fp16")
    assert "fp32" in str(exc.value)


def test_provider_options_must_name_profile_providers(tmp_path):
    path = write(tmp_path, 'name = "x"\nproviders = ["cpu"]\n[provider_options.cuda]\ndevice_id = "0"\n')
    with pytest.raises(ProfileError, match="provider_options") as exc:
        load_profile(str(path))
    assert "cuda" in str(exc.value)


def test_overrides_applied_validated_and_none_ignored():
    prof = load_profile("rpi5", precision="int8", context=2048, block_size=64, quant_algo="hqq", threads=None)
    assert (prof.precision, prof.context, prof.block_size, prof.quant_algo) == ("int8", 2048, 64, "hqq")
    assert prof.threads == 4
    assert load_profile("rpi5", context="1024", providers="cpu").context == 1024  # CLI text is accepted
    with pytest.raises(ProfileError, match="Unknown profile override 'speed'"):
        load_profile("rpi5", speed=3)
    assert with_overrides(prof, context=512).context == 512
    with pytest.raises(ProfileError, match="int4"):
        with_overrides(load_profile("android-arm64"), precision="int4")


def test_load_from_toml_path_uses_defaults_and_file_stem(tmp_path):
    path = write(tmp_path, 'precision = "int8"\ncontext = 1024\nram_budget_mb = 900\n', "myboard.toml")
    prof = load_profile(str(path))
    assert prof.name == "myboard" and prof.source == str(path)
    assert (prof.precision, prof.context, prof.ram_budget_mb, prof.backend) == ("int8", 1024, 900, "fast")
    assert Profile.from_dict(prof.to_dict()) == prof


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(write(tmp_path, "name = \n")))
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))
    notepad = tmp_path / "mine.toml"
    notepad.write_text('name = "mine"\n', encoding="utf-16")
    with pytest.raises(ProfileError, match=r"mine.toml is not UTF-8 text .* save it as UTF-8"):
        load_profile(str(notepad))


def test_unknown_profile_name_lists_available():
    with pytest.raises(ProfileError) as exc:
        load_profile("rpi6")
    msg = str(exc.value)
    assert "'rpi6'" in msg
    for name in EXPECTED:
        assert name in msg


def test_from_dict_rejects_unknown_keys():
    data = load_profile("rpi5").to_dict()
    data["turbo"] = True
    with pytest.raises(ProfileError, match="'turbo'"):
        Profile.from_dict(data)


# ---- memory


def test_kv_cache_bytes_qwen_05b():
    assert kv_cache_bytes(24, 2, 64, 32768) == 805_306_368
    assert kv_cache_bytes(24, 2, 64, 32768, dtype_bytes=2) == 805_306_368 // 2
    with pytest.raises(ProfileError, match="context"):
        kv_cache_bytes(24, 2, 64, 0)


def test_memory_budget_refuses_oversize_and_suggests_context():
    prof = load_profile("rpi4", context=32768, precision="int8")  # budget 1500 MB
    kv = kv_cache_bytes(24, 2, 64, prof.context)  # 768 MB
    with pytest.raises(ProfileError) as exc:
        check_memory_budget(prof, weight_bytes=600 * MB, kv_bytes=kv)
    msg = str(exc.value)
    assert "--context" in msg and "--precision int4" in msg and "smaller model" in msg
    suggested = int(re.search(r"at most (\d+) fits", msg).group(1))
    # 1500 - 600 - 150 = 750 MB for the cache at 24 KiB/token -> 32000 tokens (a multiple of 256).
    assert suggested == 32000
    check_memory_budget(prof, weight_bytes=600 * MB, kv_bytes=kv_cache_bytes(24, 2, 64, suggested))


def test_memory_budget_passes_fitting_and_explains_hopeless():
    prof = load_profile("rpi5")
    check_memory_budget(prof, weight_bytes=400 * MB, kv_bytes=kv_cache_bytes(24, 2, 64, prof.context))
    with pytest.raises(ProfileError, match="weights alone"):
        check_memory_budget(prof, weight_bytes=4000 * MB, kv_bytes=kv_cache_bytes(24, 2, 64, prof.context))


def test_accuracy_levels_per_layer_type_are_validated_and_recorded():
    prof = load_profile("rpi5", accuracy_levels="down_proj=0, mlp = 4")
    assert prof.accuracy_levels == {"down_proj": 0, "mlp": 4}
    assert prof.to_dict()["accuracy_levels"] == {"down_proj": 0, "mlp": 4}
    assert Profile.from_dict(prof.to_dict()).accuracy_levels == {"down_proj": 0, "mlp": 4}
    assert load_profile("rpi5").accuracy_levels == {}
    for value, words in [({"down": 0}, ["'accuracy_levels.down'", "did you mean 'down_proj'", "qkv_proj"]),
                         ({"lm_head": 5}, ["'accuracy_levels.lm_head'", "5", "0-4"]),
                         ({"attn": True}, ["'accuracy_levels.attn'", "True"]),
                         ("down_proj", ["'accuracy_levels'", "TYPE=LEVEL"]),
                         ("down_proj=x", ["'accuracy_levels'", "TYPE=LEVEL"]),
                         (["down_proj"], ["'accuracy_levels'", "layer type = level"])]:
        with pytest.raises(ProfileError) as exc:
            load_profile("rpi5", accuracy_levels=value)
        for word in words:
            assert word in str(exc.value), (value, word, str(exc.value))
