"""The ``cupyq`` command line: info, inspect, verify, bench, warmup, compile.

Exit status: 0 success, 1 verification (or kernel compilation) failure, 2 usage or input error.
Every command takes ``--json`` (a JSON report on stdout instead of the table; errors too, as ``{"error": ...}``)
and ``--json-out FILE`` / ``-o FILE`` (the table on stdout, the JSON report written to FILE; an existing FILE is
replaced only when it is a report cupyq wrote). Reports carry a ``cupyq_report`` key naming the command.

The parser and :func:`main` live here; each command is a module of this package (``info``, ``inspect``, ``verify``,
``bench``, ``warmup``, ``compile``; ``explain`` holds ``inspect --explain``) and :mod:`cupyq.cli.output` holds the
tables, progress bar and JSON reports they share.
"""

from __future__ import annotations

import argparse
import os
import sys

from cupyq.bench import FORMATS as BENCH_FORMATS
from cupyq.explain import DTYPES as EXPLAIN_DTYPES
from cupyq.cli.arguments import (_arch, _ArgumentError, _cuda_source_name, _gpu_arch, _names, _Parser,
                                 _positive_float, _positive_int, _row_counts)
from cupyq.cli.bench import cmd_bench
from cupyq.cli.common import EXIT_OK, EXIT_USAGE, UsageError
from cupyq.cli.compile import cmd_compile
from cupyq.cli.info import cmd_info
from cupyq.cli.explain import DEFAULT_MS as EXPLAIN_MS
from cupyq.cli.inspect import cmd_inspect
from cupyq.cli.output import _check_json_out, _report_json, _write_report
from cupyq.cli.verify import DEFAULT_MS, DEFAULT_TOLERANCE, cmd_verify
from cupyq.cli.warmup import cmd_warmup

# Names other code and the tests take from cupyq.cli, kept importable from here.
from cupyq.cli.bench import _speedup_rows  # noqa: F401
from cupyq.cli.common import EXIT_FAIL  # noqa: F401
from cupyq.cli.output import REPORT_KEY, Progress, format_table  # noqa: F401

__all__ = ["main", "DEFAULT_TOLERANCE", "DEFAULT_MS"]

COMMANDS = ("info", "inspect", "verify", "bench", "warmup", "compile")


def build_parser() -> argparse.ArgumentParser:
    import cupyq
    from cupyq import model_bench

    parser = _Parser(
        prog="cupyq",
        description="GPTQ, EXL2 and AWQ quantized linear layers on NVIDIA GPUs (CUDA C kernels compiled at run "
                    "time by NVRTC).",
        epilog="Exit status: 0 success, 1 verification or compilation failure, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"cupyq {cupyq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print a JSON report on stdout instead of the table (errors too, as {\"error\": ...})")
    common.add_argument("--json-out", "-o", metavar="FILE",
                        help="also write the JSON report to FILE, keeping the table on stdout; an existing FILE is "
                             "replaced only when it is a JSON report written by cupyq")

    p = sub.add_parser("info", parents=[common], help="GPUs, library versions and the kernel cache",
                       description="Show GPUs (compute capability, SMs, memory), CuPy/CUDA/NVRTC/torch versions and "
                                   "the kernel cache directory with what it holds. Works without a GPU.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("inspect", parents=[common], help="list the layers of a checkpoint",
                       description="Per layer of a GPTQ / EXL2 / AWQ / mixed checkpoint directory: format, bits (EXL2: the "
                                   "mix of widths), bits per weight, group size, act-order, shape and bytes; totals. "
                                   "With --explain instead: per quantized layer, the kernel each batch size (--m) gets "
                                   "on a GPU architecture (--arch) and the dispatch rule's reason, worked out on the "
                                   "CPU.")
    p.add_argument("path", help="checkpoint directory (or a single .safetensors file)")
    p.add_argument("--explain", action="store_true",
                   help="instead, per quantized layer, the kernel each batch size gets and the dispatch rule's "
                        "reason, worked out on the CPU (no GPU asked, nothing compiled)")
    p.add_argument("--arch", type=_gpu_arch, metavar="ARCH",
                   help="--explain: the GPU architecture, such as sm_80, sm_86, sm_89 or sm_90 (default: the "
                        "current GPU's, or sm_90 when none is visible)")
    p.add_argument("--m", type=_row_counts, action="append", metavar="M[,M...]",
                   help="--explain: rows of x, a comma-separated list or the option repeated (default "
                        f"{','.join(map(str, EXPLAIN_MS))})")
    p.add_argument("--dtype", choices=EXPLAIN_DTYPES, help="--explain: activation dtype (default float16)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="check the GPU kernels against the float32 reference",
                       description="Build every quantized layer, run cupyq.gemm on random fp16 inputs for a few m and "
                                   "compare with the float32 NumPy reference (relative Frobenius error). Without a "
                                   "path the built-in sample (GPTQ 4-bit act-order, GPTQ 3-bit v2, EXL2 mixed, AWQ 4-bit) is "
                                   "made in a temporary directory. Without a GPU the CPU reference path is checked, "
                                   "the output says that no GPU kernel ran and the exit status is still 0 unless "
                                   "--require-gpu is given. Exit status 1 when a layer fails.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="checkpoint directories (default: the built-in sample)")
    p.add_argument("--m", type=_row_counts, action="append", metavar="M[,M...]",
                   help=f"rows of x to test: a comma-separated list or the option repeated, --m 1,7 or --m 1 --m 7 "
                        f"(default: {','.join(map(str, DEFAULT_MS))})")
    p.add_argument("--tolerance", type=_positive_float, default=DEFAULT_TOLERANCE,
                   help=f"largest relative error allowed (default {DEFAULT_TOLERANCE:g}: fp16 rounding gives ~1e-3, "
                        "real bugs give 0.1 or more)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--reps", type=_positive_int, default=20, help="timed repetitions per m (default 20)")
    p.add_argument("--cpu", action="store_true", help="check the CPU reference path even when a GPU is present")
    p.add_argument("--require-gpu", action="store_true",
                   help="exit with status 1 when no GPU kernel can run (without it, a machine without a GPU checks "
                        "the CPU path and exits 0)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", parents=[common], help="benchmark the kernels against fp16 (needs a GPU)",
                       description="Run cupyq.bench.run_benchmark on the checkpoint's layer shapes (or the six standard "
                                   "shapes) and print microseconds per call and the speed-up over an fp16 matmul. "
                                   "With --model, time a Llama-3-8B-shaped model patched with cupyq against the same "
                                   "model in fp16 instead (cupyq.model_bench: decode batches and prefill lengths "
                                   "under CUDA-graph replay; needs transformers).")
    p.add_argument("path", nargs="?", help="checkpoint directory whose layer shapes to use (default: standard shapes)")
    p.add_argument("--m", "--ms", dest="m", type=_row_counts, action="append", metavar="M[,M...]",
                   help="rows of x: a comma-separated list or the option repeated, --m 1,16 or --m 1 --m 16; --ms is "
                        "the same option, as in scripts/bench.py (default: the benchmark's own list)")
    p.add_argument("--formats", nargs="+", type=_names(BENCH_FORMATS), metavar="FORMAT",
                   help=f"formats to run, of {', '.join(BENCH_FORMATS)} (gptq_bf16: gptq with bfloat16 activations): "
                        "separated by commas or spaces, --formats gptq,exl2 or --formats gptq exl2 (default: those in "
                        "the checkpoint, or gptq, gptq_act and exl2)")
    p.add_argument("--iters", type=_positive_int, default=40, help="calls per timing (default 40)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="CUDA-graph replays per point for graph_us, the median is kept (default 5)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the speed-up over fp16 against m (needs matplotlib)")
    p.add_argument("--model", action="store_true",
                   help="benchmark a whole decoder model instead of single layers (the options below; --iters, "
                        "--repeats, --m, --formats, --plot and a path are for the layer benchmark)")
    p.add_argument("--layers", type=_positive_int, metavar="N",
                   help=f"--model: decoder layers (default {model_bench.DEFAULT_LAYERS})")
    p.add_argument("--format", choices=model_bench.FORMATS,
                   help="--model: the quantized model's checkpoint format, GPTQ 4-bit act-order or EXL2 at about "
                        "4.65 bits per weight (default gptq)")
    p.add_argument("--batches", type=_row_counts, action="append", metavar="B[,B...]",
                   help="--model: decode batch sizes, a comma-separated list or the option repeated (default "
                        f"{','.join(map(str, model_bench.DEFAULT_BATCHES))})")
    p.add_argument("--prefill", type=_row_counts, action="append", metavar="T[,T...]",
                   help="--model: prefill lengths in tokens, as --batches (default "
                        f"{','.join(map(str, model_bench.DEFAULT_PREFILL))})")
    p.add_argument("--dry-run", action="store_true",
                   help="--model: a tiny model on the CPU with its own small batches, through the whole flow; times "
                        "nothing and needs no GPU")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("warmup", parents=[common], help="compile every kernel a checkpoint needs (needs a GPU)",
                       description="Load every quantized layer of the checkpoint (default: the built-in sample) on the "
                                   "GPU and compile / load every kernel it needs, so that later calls (and CUDA-graph "
                                   "capture) never compile. Reports the time taken.")
    p.add_argument("path", nargs="?", help="checkpoint directory (default: the built-in sample)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--max-m", type=_positive_int, default=64, help="largest m to prepare kernels for (default 64)")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("compile", parents=[common], help="compile the CUDA sources with NVRTC (no GPU needed)",
                       description="Compile every cuda_src/*.cu for each architecture with NVRTC and report time and "
                                   "cubin size. Exit status 1 with the compiler log on any error or warning, and with "
                                   "--check-resources also when ptxas gives a kernel a stack frame or spills.")
    p.add_argument("--arch", action="append", metavar="ARCH", type=_arch,
                   help="target such as sm_80, 90 or sm_90a, sm_80 or newer; repeatable (default: sm_80 and sm_90)")
    p.add_argument("--source", action="append", metavar="FILE", type=_cuda_source_name,
                   help="only this .cu file of the package (a bare name such as qgemm.cu); repeatable (default: all)")
    p.add_argument("--check-resources", action="store_true",
                   help="also read ptxas's report of every kernel (the same compile, with -Xptxas -v) and exit 1 "
                        "naming each kernel that needs a stack frame or spills registers")
    p.set_defaults(func=cmd_compile)
    return parser


def _report_error(args, argv, message):
    """An error under --json / --json-out: ``{"error": ...}`` on stdout and in the file (when it may be written)."""
    words = list(sys.argv[1:] if argv is None else argv)
    wants_json = bool(getattr(args, "json", False)) if args is not None else "--json" in words
    command = getattr(args, "command", None) or next((w for w in words if w in COMMANDS), None)
    blob = _report_json(command, {"error": message})
    if wants_json:
        print(blob)
    target = getattr(args, "json_out", None)
    if target:
        try:
            _write_report(target, blob)
        except (UsageError, OSError):
            pass  # the error is already on stderr; a file that may not be replaced stays as it is


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 verification failure, 2 usage/input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except _ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        _report_error(None, argv, str(exc))
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from cupyq.checkpoint import CheckpointError
    from cupyq.device import SetupError

    try:
        if getattr(args, "json_out", None):
            _check_json_out(args.json_out)  # before any work: a refused file name fails at once
        return args.func(args)
    except (UsageError, CheckpointError, SetupError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as exc:
        print(f"cupyq {args.command}: error: {exc}", file=sys.stderr)
        _report_error(args, argv, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cupyq {args.command}: interrupted", file=sys.stderr)
        from cupyq import nvrtc

        if argv is None and nvrtc.compile_threads_running():
            # Run as the program (argv from sys.argv) while NVRTC is still compiling in daemon threads: a normal
            # interpreter exit would unload the library under them and crash, so leave at once (nothing is
            # left to save). Called from Python with an argv, return as usual.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
