"""Facts about the machine we run on: architecture, CPU model, SIMD extensions, cores and RAM.

The ``host`` profile is built from these, and the bundle manifest records them, so that a slow or
failing bundle can be traced to the machine it was tuned on. Detection must never fail: every probe
falls back to something plausible, because a missing ``/proc`` file is not worth an exception.
Standard library only (the lean runtime imports this).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["HostInfo", "detect_host", "parse_cpuinfo"]

# Linux /proc/cpuinfo flag -> our ISA name. x86 "flags" and ARM "Features" lines share one table.
_LINUX_FLAGS: dict[str, str] = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni",
    "amx_tile": "amx", "amx_int8": "amx",
    "asimd": "neon", "asimddp": "asimddp", "i8mm": "i8mm", "sve": "sve", "asimdhp": "fp16", "fphp": "fp16",
}
# Canonical order, so descriptions and manifests are stable across probes.
ISA_ORDER = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx",
             "neon", "asimddp", "i8mm", "sve", "fp16")

# ARM "CPU part" ids of common cores: ARM boards rarely print a "model name", and "Cortex-A76" tells a
# reader far more than "0xd0b".
_ARM_PARTS: dict[str, str] = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "i386": "x86", "i686": "x86"}


@dataclass(frozen=True)
class HostInfo:
    """What this machine is. ``isa`` lists only the extensions that matter for LLM kernels."""

    arch: str
    cpu_model: str
    isa: tuple[str, ...]
    cores: int
    ram_mb: int
    os: str


def _ordered(isa: set[str]) -> tuple[str, ...]:
    return tuple(x for x in ISA_ORDER if x in isa)


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...], int]:
    """Parse ``/proc/cpuinfo`` text into (cpu model, ISA, physical cores or 0 if unknowable).

    Separate from the file read so tests can feed it captured x86 and Raspberry Pi output.
    """
    model = board = hardware = ""
    parts: list[str] = []
    isa: set[str] = set()
    cores: set[tuple[str, str]] = set()
    phys_id = ""
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if not sep:
            continue
        key, val = key.strip().lower(), val.strip()
        if key == "model name" and not model:
            model = val
        elif key == "model" and not val.isdigit() and not board:
            board = val  # Raspberry Pi: "Raspberry Pi 5 Model B Rev 1.0" (x86 uses a number here)
        elif key == "hardware" and not hardware:
            hardware = val
        elif key == "cpu part" and val.lower() not in parts:
            parts.append(val.lower())
        elif key in ("flags", "features"):
            isa.update(_LINUX_FLAGS[f] for f in val.split() if f in _LINUX_FLAGS)
        elif key == "physical id":
            phys_id = val
        elif key == "core id":
            cores.add((phys_id, val))
    core_names = "+".join(_ARM_PARTS.get(p, f"part {p}") for p in parts)
    if not model:
        model = board or hardware
        if core_names:
            model = f"{model} ({core_names})" if model else core_names
    return model, _ordered(isa), len(cores)


def _sysctl(name: str) -> str:
    try:
        res = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _usable_cpus() -> int:
    """CPUs this process may run on: affinity masks (taskset) and a cgroup CPU quota (docker --cpus)
    both shrink it, and more intra-op threads than that only adds contention."""
    try:
        usable = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    quota = _read("/sys/fs/cgroup/cpu.max").split()
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
        usable = min(usable, max(1, int(quota[0]) // int(quota[1])))
    return usable


def _linux_ram_mb() -> int:
    total = 0
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", _read("/proc/meminfo"), re.MULTILINE)
    if m:
        total = int(m.group(1)) // 1024
    # A container's memory limit is the real ceiling; without it the budget would assume the whole host.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read(path).strip()
        if limit.isdigit() and 0 < int(limit) // (1024 * 1024) < (total or 1 << 40):
            total = int(limit) // (1024 * 1024)
    return total


def _sysconf_ram_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (AttributeError, ValueError, OSError):
        return 0


def _windows_facts() -> tuple[set[str], int]:
    """ISA bits and RAM on Windows through kernel32, which needs no extra package."""
    isa: set[str] = set()
    ram = 0
    try:
        import ctypes

        k32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        # PF_* ids from winnt.h: AVX 39, AVX2 40, AVX512F 41, ARM v8.2 dot product 43.
        for pf, name in ((39, "avx"), (40, "avx2"), (41, "avx512f"), (43, "asimddp")):
            if k32.IsProcessorFeaturePresent(pf):
                isa.add(name)

        class _MemStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        stat = _MemStatus()
        stat.dwLength = ctypes.sizeof(_MemStatus)
        if k32.GlobalMemoryStatusEx(ctypes.byref(stat)):
            ram = int(stat.ullTotalPhys) // (1024 * 1024)
    except Exception:  # noqa: BLE001 - any ctypes failure just means "unknown"
        pass
    return isa, ram


def _macos_facts(arch: str) -> tuple[str, set[str], int, int]:
    model = _sysctl("machdep.cpu.brand_string")
    isa: set[str] = set()
    if arch in ("arm64", "aarch64"):
        isa.add("neon")
        for key, name in (("FEAT_DotProd", "asimddp"), ("FEAT_I8MM", "i8mm"), ("FEAT_FP16", "fp16")):
            if _sysctl(f"hw.optional.arm.{key}") == "1":
                isa.add(name)
    else:
        feats = (_sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")).lower()
        mac_flags = {"avx1.0": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
                     "avx512bw": "avx512bw", "avx512vnni": "avx512vnni"}
        isa.update(v for k, v in mac_flags.items() if k in feats.split())
    cores = int(_sysctl("hw.physicalcpu") or 0)
    mem = _sysctl("hw.memsize")
    return model, isa, cores, int(mem) // (1024 * 1024) if mem.isdigit() else 0


@lru_cache(maxsize=1)
def detect_host() -> HostInfo:
    """Probe this machine once per process (the facts do not change while it runs)."""
    system = platform.system()
    arch = platform.machine().lower() or "unknown"
    arch = _ARCH_ALIASES.get(arch, arch)
    model, isa, cores, ram = "", set(), 0, 0
    if system == "Linux" or os.path.exists("/proc/cpuinfo"):
        model, isa_t, cores = parse_cpuinfo(_read("/proc/cpuinfo"))
        isa = set(isa_t)
        ram = _linux_ram_mb()
    elif system == "Darwin":
        model, isa, cores, ram = _macos_facts(arch)
    elif system == "Windows":
        isa, ram = _windows_facts()
    if arch in ("aarch64", "arm64"):
        isa.add("neon")  # mandatory in ARMv8-A, whether or not the OS lists it
    usable = _usable_cpus()
    cores = min(cores, usable) if cores > 0 else usable
    return HostInfo(
        arch=arch,
        cpu_model=model or platform.processor() or arch,
        isa=_ordered(isa),
        cores=max(cores, 1),
        ram_mb=ram or _sysconf_ram_mb(),
        os=system or "unknown",
    )
