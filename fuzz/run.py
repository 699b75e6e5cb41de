"""`make fuzz`: every target of fuzz_decoders.py for a fixed time; prints executions and executions/s.

Corpora are kept in fuzz/corpus/TARGET (git-ignored) so later runs start where earlier ones
stopped; a crash (any exception the decoder's promise does not allow) stops that target, leaves
`fuzz/crash-*` with the input, and makes this script exit 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("stream", "datagram", "protocol", "radius")


def main() -> int:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    failed = False
    print(f"fuzzing each decoder for {seconds} s (atheris/libFuzzer)")
    for target in TARGETS:
        corpus = HERE / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, str(HERE / "fuzz_decoders.py"), target, str(corpus), f"-max_total_time={seconds}",
             "-print_final_stats=1", f"-artifact_prefix={HERE}/crash-{target}-"],
            capture_output=True, text=True, check=False)
        out = proc.stderr
        runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
        rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", out)
        status = "ok" if proc.returncode == 0 else f"CRASH (exit {proc.returncode})"
        print(f"  {target:<9} {int(runs.group(1)) if runs else 0:>12,} executions  "
              f"{int(rate.group(1)) if rate else 0:>9,}/s  {status}")
        if proc.returncode != 0:
            failed = True
            print("\n".join(out.splitlines()[-25:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
