"""Kernel benchmark (the module cupyq.bench, as a script): cupyq GPTQ / EXL2 against torch fp16 matmul and
torch's int4 kernel on the six standard shapes, writing JSON and a markdown table.

    python scripts/bench.py --json out/bench.json --markdown out/bench.md
    python scripts/bench.py --shapes 4096x4096 --ms 1,16 --baselines ''
    python scripts/bench.py --formats gptq,gptq_bf16 --baselines fp16     # bf16 activations beside fp16

The rows of x take the syntax of ``cupyq bench``: ``--ms 1,16``, ``--m 1,16`` and ``--m 1 --m 16`` are the same.
"""

from cupyq.bench import main

if __name__ == "__main__":
    main()
