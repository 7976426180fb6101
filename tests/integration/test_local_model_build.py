"""The installed llama.cpp is portable, and a machine that cannot run a build is told so.

Machines of our kind differ in CPU from one session to the next (some report AVX-512 and AMX
that the hypervisor does not enable), so these checks read the installed binary, not the CPU:
a build with AMX or AVX-512 code fails here on any machine, with or without those features.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docqueue.workers.local.model import (
    amx_enabled,
    build_features,
    check_llama_cpp,
    cpu_flags,
    unusable_features,
)
from tests.conftest import IN_CI
from tests.integration.test_localmodel import require_local_extra

pytestmark = [pytest.mark.local_model]

# AMX: tile configuration, loads and the tile dot products. AVX-512: any zmm register or
# opmask register use (k0-k7 appear only in AVX-512 code).
AMX = re.compile(r"\b(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilezero|tdpb\w+|"
                 r"tdpfp16ps|tilerelease)\b")
AVX512 = re.compile(r"%zmm\d+|\{%k[1-7]\}")


def llama_cpu_libraries() -> list[Path]:
    require_local_extra()
    import llama_cpp

    root = Path(llama_cpp.__file__).parent
    found = sorted(p for p in root.rglob("*.so*") if "ggml" in p.name or "llama" in p.name)
    assert found, f"no llama.cpp library under {root}"
    return found


def disassembly(library: Path) -> str:
    objdump = shutil.which("objdump")
    if objdump is None:
        message = "objdump (binutils) is needed to read the installed llama.cpp"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout


def test_the_installed_llama_cpp_holds_no_amx_and_no_avx512_instruction() -> None:
    # Given every llama.cpp library the local extra installed
    offenders = {}
    for library in llama_cpu_libraries():
        code = disassembly(library)
        hits = sorted(set(AMX.findall(code))) + sorted(set(AVX512.findall(code)))[:3]
        if hits:
            offenders[library.name] = hits
    # Then none uses an instruction a machine of our kind may report but not enable
    assert offenders == {}, (
        "llama.cpp was built with CPU-specific flags; install it as the README says "
        f"(CMAKE_ARGS with GGML_NATIVE=OFF): {offenders}")


def test_the_installed_build_reports_avx2_and_nothing_above_it() -> None:
    require_local_extra()
    probe = subprocess.run(
        [sys.executable, "-c",
         "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
        capture_output=True, text=True, check=True, timeout=120)
    features = build_features(probe.stdout)
    assert "AVX2" in features, probe.stdout
    assert not features & {"AVX512", "AMX_INT8", "AVX512_VNNI", "AVX512_BF16"}, probe.stdout


def test_the_local_model_starts_only_on_a_machine_that_runs_its_build() -> None:
    # The check the server start runs passes here (CI proves the build runs on this CPU) ...
    check_llama_cpp()
    # ... and a build that needs what a machine lacks is refused with a reason
    assert unusable_features({"AVX2", "AMX_INT8"}, {"avx2"}, amx=False) == (
        "AMX instructions, which this machine does not enable (its CPU may report them)")
    assert unusable_features({"AVX2", "AVX512"}, {"avx2", "fma"}, amx=False) == (
        "AVX512 instructions, which this CPU lacks")
    assert unusable_features({"AVX", "AVX2", "FMA"}, {"avx", "sse4_2"}, amx=False) == (
        "AVX2, FMA instructions, which this CPU lacks")
    assert unusable_features({"AVX2", "FMA", "F16C"}, {"avx2", "fma", "f16c"}, amx=False) is None
    flags = cpu_flags()
    assert flags is None or "avx2" in flags
    # and a CPU that does not list AMX never gets it enabled
    if flags is not None and "amx_tile" not in flags:
        assert amx_enabled() is False
