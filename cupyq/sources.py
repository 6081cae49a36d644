"""Where the CUDA C sources (``*.cu``, ``*.cuh``) live at run time.

An installed wheel carries them as package data of ``cupyq.cuda_src`` (``<site-packages>/cupyq/cuda_src``).
An editable install or a plain source checkout (``PYTHONPATH=.``) uses the top-level ``cuda_src/``
folder next to the ``cupyq/`` package folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["cuda_source_dir", "kernel_source", "list_cuda_sources", "read_cuda_source"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _candidate_dirs():
    # 1. wheel layout: the data package sits inside cupyq/.
    yield _PACKAGE_DIR / "cuda_src"
    # 2. source checkout / editable install: cuda_src/ beside cupyq/.
    yield _PACKAGE_DIR.parent / "cuda_src"
    # 3. wherever an import finder maps the data package (e.g. an editable install's path mapping).
    try:
        spec = importlib.util.find_spec("cupyq.cuda_src")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location)


@lru_cache(maxsize=None)
def cuda_source_dir() -> Path:
    """The directory that holds cupyq's ``*.cu`` / ``*.cuh`` files, as an absolute ``pathlib.Path``.

    Raises FileNotFoundError when neither the installed package data nor a source checkout's
    ``cuda_src/`` folder exists.
    """
    tried = []
    for candidate in _candidate_dirs():
        if candidate.is_dir():
            return candidate.resolve()
        tried.append(str(candidate))
    raise FileNotFoundError(
        "cupyq CUDA sources not found; looked in: " + ", ".join(tried) + ". Reinstall cupyq or run from a "
        "source checkout that has cuda_src/."
    )


def list_cuda_sources() -> list[Path]:
    """Sorted absolute paths of the ``*.cu`` translation units (headers ``*.cuh`` are not listed)."""
    return sorted(p for p in cuda_source_dir().glob("*.cu") if p.is_file())


def read_cuda_source(name: str) -> str:
    """Text (UTF-8) of one source file of :func:`cuda_source_dir`, e.g. ``"gemm_gptq.cu"``.

    ``name`` is a bare file name; paths are refused (ValueError), a missing file raises
    FileNotFoundError listing the files that exist.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a file name string, got {type(name).__name__}")
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"name: expected a bare file name such as 'kernel.cu', got {name!r}")
    directory = cuda_source_dir()
    path = directory / name
    if not path.is_file():
        available = sorted(p.name for p in directory.iterdir() if p.suffix in (".cu", ".cuh"))
        raise FileNotFoundError(f"no CUDA source {name!r} in {directory}; available: {available}")
    return path.read_text(encoding="utf-8")


def _headers_digest(directory: Path) -> str:
    stats = [(p, p.stat()) for p in sorted(directory.glob("*.cuh"))]
    return _digest(tuple((p, st.st_mtime_ns, st.st_size) for p, st in stats))


@lru_cache(maxsize=None)
def _digest(headers: tuple) -> str:  # keyed on (path, mtime, size): read again only when a header changes
    digest = hashlib.sha256()
    for path, _, _ in headers:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def kernel_source(name: str) -> str:
    """The text NVRTC compiles for ``cuda_src/name`` at run time: the file of :func:`read_cuda_source`, then a
    comment line with a digest of every header (``*.cuh``) beside it.

    CuPy's kernel cache and cupyq's cubin cache key compiled kernels on this text; without the digest, a changed
    header under an unchanged ``.cu`` file (a cupyq upgrade) would load kernels compiled from the old header.
    """
    code = read_cuda_source(name)
    return f"{code}\n// cupyq headers {_headers_digest(cuda_source_dir())}\n"
