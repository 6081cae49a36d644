"""Model-level benchmark (the module cupyq.model_bench, as a script; `cupyq bench --model` is the same): a
Llama-3-8B-shaped decoder patched with cupyq against the same model in fp16.

  python scripts/model_bench.py --json out.json [--layers 4] [--format gptq|exl2] [--batches 1,8,32,128]
                                [--prefill 512,2048]
  python scripts/model_bench.py --dry-run      # tiny config on the CPU: the whole flow, no timing claims

Prints one JSON line per case; --json writes the whole report.
"""

import sys

from cupyq.model_bench import main

if __name__ == "__main__":
    sys.exit(main())
