"""The text compiled at run time changes with every header, so cached kernels never outlive a header change."""

import shutil

import pytest

from cupyq import nvrtc, sources


def _copy_sources(tmp_path, monkeypatch):
    copy = tmp_path / "cuda_src"
    shutil.copytree(sources.cuda_source_dir(), copy)
    monkeypatch.setattr(sources, "cuda_source_dir", lambda: copy)
    return copy


def test_kernel_source_is_the_file_then_a_header_digest():
    code = sources.kernel_source("qgemm.cu")
    body, tail = code.rsplit("\n// cupyq headers ", 1)
    assert body == sources.read_cuda_source("qgemm.cu")
    assert len(tail.strip()) == 64 and int(tail, 16) >= 0


@pytest.mark.parametrize("header", ["qdq.cuh", "tensor_tiles.cuh"])
def test_a_changed_header_changes_the_compiled_text(tmp_path, monkeypatch, header):
    copy = _copy_sources(tmp_path, monkeypatch)
    before = {name: sources.kernel_source(name) for name in ("qgemm.cu", "qmma.cu", "qwgmma.cu")}
    path = copy / header
    path.write_text(path.read_text() + "\n// changed\n")
    after = {name: sources.kernel_source(name) for name in before}
    for name in before:
        assert after[name] != before[name], name
        assert after[name].startswith(sources.read_cuda_source(name))


def test_an_unchanged_tree_gives_the_same_text(tmp_path, monkeypatch):
    first = sources.kernel_source("qmma.cu")
    _copy_sources(tmp_path, monkeypatch)
    assert sources.kernel_source("qmma.cu") == first


def test_nvrtc_compiles_the_run_time_text():
    lib = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    nvrtc.load_builtins()  # as every compile of the run time does first
    prog = lib.createProgram(sources.kernel_source("qgemm.cu"), "qgemm.cu", [], [])
    try:
        lib.addNameExpression(prog, "gather_columns<__half>")
        lib.compileProgram(prog, nvrtc.nvrtc_options("sm_80"))
        assert lib.getLoweredName(prog, "gather_columns<__half>").startswith("_Z")
    finally:
        lib.destroyProgram(prog)
