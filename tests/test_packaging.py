"""Packaging: the CUDA sources ship inside the wheel and are found from a wheel, an editable install
and a plain source checkout.

The wheel and the editable wheel are built from a copy of the project (so the checkout gets no build
artefacts) and installed with --no-deps into a fresh virtual environment that cannot see the checkout:
the interpreter runs from a temporary directory with PYTHONPATH unset.
"""

import configparser
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from cupyq import bench, sources

REPO = Path(__file__).resolve().parents[1]
CUDA_SUFFIXES = (".cu", ".cuh")

_PROBE = """
import json, cupyq, cupyq.sources as s
d = s.cuda_source_dir()
print(json.dumps({
    "cupyq": cupyq.__file__,
    "dir": str(d),
    "files": sorted(p.name for p in d.iterdir() if p.suffix in (".cu", ".cuh")),
    "cu": [p.name for p in s.list_cuda_sources()],
}))
"""


def _repo_cuda_files():
    return sorted(p.name for p in (REPO / "cuda_src").iterdir() if p.suffix in CUDA_SUFFIXES)


def _clean_env():
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd, cwd, env=None):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=str(cwd), env=env or _clean_env(), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _copy_project(dst):
    """Copy what a build needs (metadata, the package, the CUDA sources) into ``dst``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "cupyq", dst / "cupyq", ignore=ignore)
    shutil.copytree(REPO / "cuda_src", dst / "cuda_src", ignore=ignore)
    shutil.copytree(REPO / "benchmarks", dst / "benchmarks", ignore=ignore)
    return dst


def _fresh_venv(path):
    """A venv without pip (pip of the running interpreter installs into it with --python)."""
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    return path / "bin" / "python"


def _pip_install(target_python, wheel, cwd):
    _run(
        [sys.executable, "-m", "pip", "--python", target_python, "install", "--no-deps", "--no-index",
         "--force-reinstall", wheel],
        cwd,
    )


def _probe(python, cwd):
    return json.loads(_run([python, "-c", _PROBE], cwd).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(project copy, wheel path, editable wheel path)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    _copy_project(src)
    dist = root / "dist"
    dist.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
         root)
    wheel = next(dist.glob("cupyq-*.whl"))
    edist = root / "edist"
    edist.mkdir()
    _run([sys.executable, "-c",
          "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))", edist], src)
    editable = next(edist.glob("cupyq-*.whl"))
    return src, wheel, editable


def test_cuda_sources_exist_in_checkout():
    files = _repo_cuda_files()
    assert any(f.endswith(".cu") for f in files), f"cuda_src/ has no .cu file: {files}"


@pytest.mark.slow
def test_wheel_contains_package_and_cuda_sources(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        console = configparser.ConfigParser()
        console.read_string(zf.read(entry_points).decode())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        for name in _repo_cuda_files():
            member = f"cupyq/cuda_src/{name}"
            assert member in names, f"{member} missing from the wheel"
            assert zf.read(member) == (REPO / "cuda_src" / name).read_bytes()
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "cupyq").rglob("*.py") if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"package modules missing from the wheel (add their package to setup.cfg): {missing}"
    assert console["console_scripts"]["cupyq"] == "cupyq.cli:main"
    assert "Requires-Python: >=3.10" in metadata
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


@pytest.mark.slow
def test_wheel_carries_only_the_recorded_peer_figures_of_benchmarks(built, tmp_path):
    """cupyq.bench reads benchmarks/recorded_peers.json; the wheel has that file (and no benchmark rows), and the
    unpacked wheel finds it without the checkout."""
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        shipped = sorted(n for n in zf.namelist() if n.startswith("cupyq/benchmarks/"))
        assert shipped == ["cupyq/benchmarks/recorded_peers.json"], shipped
        assert zf.read(shipped[0]) == (REPO / "benchmarks" / "recorded_peers.json").read_bytes()
        zf.extractall(tmp_path / "site")
    env = _clean_env()
    env["PYTHONPATH"] = str(tmp_path / "site")  # the running interpreter brings numpy
    probe = "import cupyq.bench as b; print(b._recorded_peers_path()); print(sorted(b.UPSTREAM_US))"
    path, shapes = _run([sys.executable, "-c", probe], tmp_path, env).strip().splitlines()[-2:]
    assert Path(path) == tmp_path / "site" / "cupyq" / "benchmarks" / "recorded_peers.json"
    assert shapes == str(sorted(bench.SHAPES))


@pytest.mark.slow
def test_wheel_carries_licence_typing_marker_and_classifiers(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licences = [n for n in names if ".dist-info/licenses/" in n or n.endswith(".dist-info/LICENSE")]
        assert licences, f"no licence file in the wheel: {sorted(names)}"
        assert zf.read(licences[0]) == (REPO / "LICENSE").read_bytes()
    assert "cupyq/py.typed" in names
    assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Classifier: Programming Language :: Python :: {version}" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_licence_and_typing_marker_in_checkout():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    assert (REPO / "cupyq" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["license"] == "Apache-2.0"
    assert "py.typed" in cfg["options.package_data"]["cupyq"]


@pytest.mark.slow
def test_installed_wheel_finds_cuda_sources(built, tmp_path):
    _, wheel, _ = built
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, wheel, tmp_path)
    found = _probe(python, tmp_path)
    venv_dir = (tmp_path / "venv").resolve()
    assert Path(found["cupyq"]).resolve().is_relative_to(venv_dir), found
    assert Path(found["dir"]).is_relative_to(venv_dir), found
    assert Path(found["dir"]).parts[-2:] == ("cupyq", "cuda_src")
    assert found["files"] == _repo_cuda_files()
    assert found["cu"] == sorted(f for f in _repo_cuda_files() if f.endswith(".cu"))


@pytest.mark.slow
def test_editable_install_finds_cuda_sources(built, tmp_path):
    src, _, editable = built
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, editable, tmp_path)
    found = _probe(python, tmp_path)
    assert Path(found["cupyq"]).resolve() == (src / "cupyq" / "__init__.py").resolve(), found
    assert Path(found["dir"]) == (src / "cuda_src").resolve()
    assert found["files"] == _repo_cuda_files()


def test_source_checkout_finds_cuda_sources(tmp_path):
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO)
    found = json.loads(_run([sys.executable, "-c", _PROBE], tmp_path, env).strip().splitlines()[-1])
    assert Path(found["cupyq"]).resolve() == (REPO / "cupyq" / "__init__.py").resolve()
    assert Path(found["dir"]) == (REPO / "cuda_src").resolve()
    assert found["files"] == _repo_cuda_files()


def test_list_and_read_cuda_sources():
    cu = sources.list_cuda_sources()
    assert cu == sorted(cu)
    assert all(p.suffix == ".cu" and p.is_absolute() for p in cu)
    assert [p.name for p in cu] == sorted(f for f in _repo_cuda_files() if f.endswith(".cu"))
    for name in _repo_cuda_files():
        assert sources.read_cuda_source(name) == (REPO / "cuda_src" / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["../setup.cfg", "sub/x.cu", "", ".."])
def test_read_cuda_source_refuses_paths(name):
    with pytest.raises(ValueError, match="name"):
        sources.read_cuda_source(name)


def test_read_cuda_source_missing_file_lists_available():
    with pytest.raises(FileNotFoundError, match="available"):
        sources.read_cuda_source("no_such_kernel.cu")
    with pytest.raises(TypeError, match="name"):
        sources.read_cuda_source(3)


def test_sdist_carries_the_test_suite_and_the_documents(tmp_path):
    """An unpacked sdist runs its test suite: every tracked test module, conftest.py and the test data, the
    scripts, the documents README links to and the CI script are in it; no bytecode or caches."""
    import tarfile

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked file list is unknown")
    src = tmp_path / "src"
    for name in tracked.stdout.split():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    _run([sys.executable, "-c",
          "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))", dist], src)
    sdist = next(dist.glob("cupyq-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = [n for n in tracked.stdout.split() if n.startswith(("tests/", "scripts/", "cuda_src/"))]
    wanted += ["LICENSE", "README.md", "BENCHMARKS.md", ".ci/run", "tests/conftest.py", "setup.cfg"]
    missing = sorted(n for n in wanted if n not in names)
    assert not missing, f"missing from the sdist (MANIFEST.in): {missing}"
    junk = sorted(n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo")))
    assert not junk, f"bytecode in the sdist: {junk}"
