"""cupyq: GPTQ, EXL2 and AWQ quantized linear layers on NVIDIA GPUs, compiled at run time by NVRTC."""

__version__ = "0.1.0"

__all__ = ["QMatrix", "gemm", "patch_model", "__version__"]

_SUBMODULES = ("awq", "bench", "checkpoint", "device", "distributed", "exllamav2", "formats", "kernels", "layout",
               "model", "model_bench", "nvrtc", "quantize", "reference", "runtime", "sample", "scratch", "torch_ops")


def __getattr__(name):
    # Lazy imports keep `import cupyq` cheap and free of CuPy/torch imports; what was imported is kept in the
    # module's namespace, so that `cupyq.gemm` in a hot loop is a plain attribute read after the first.
    if name == "QMatrix":
        from cupyq.qmatrix import QMatrix as value
    elif name == "gemm":
        from cupyq.dispatch import gemm as value
    elif name == "patch_model":
        from cupyq.model import patch_model as value
    elif name in _SUBMODULES:
        import importlib

        value = importlib.import_module(f"cupyq.{name}")
    else:
        raise AttributeError(f"module 'cupyq' has no attribute {name!r}")
    globals()[name] = value
    return value
