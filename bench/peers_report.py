"""The torch backend against the MixLoRA-style peer (issue 9's CPU targets), one table row per
pytest-benchmark JSON of the paired and memory benchmarks:

    pytest bench/test_bench_layer.py bench/test_bench_memory.py -k "paired or memory" \
        --bench-shape cpu-small --bench-rounds T --bench-dropout P --bench-threads 2 \
        [--bench-recompute] --benchmark-json=RUN.json
    python -m bench.peers_report RUN.json ... [--out TABLE.md]

Every ratio is taken inside one file's run: the speed-up is the median of per-round ratios of
interleaved calls (``test_paired_ratios``); the own floor is the torch time over its base-GEMM
units, one unit being a sixth of the dense frozen SwiGLU fwd+bwd of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.report import DENSE_UNITS, TARGET_OWN_FLOOR, TARGET_SAVED_RATIO, TARGET_VS_MIXLORA


def _row(data: dict[str, Any]) -> list[str]:
    by_kind: dict[tuple[str, str], dict[str, Any]] = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        by_kind[(extra.get("kind"), extra.get("impl"))] = extra
    paired = by_kind[("paired", "all")]
    entries, rounds = paired["paired"], int(paired["rounds"])
    recompute = bool(paired.get("recompute_intermediates", True))
    units = (8 if recompute else DENSE_UNITS) * rounds
    torch_entry, mix = entries["torch"], entries["mixlora"]
    speedup = torch_entry["speedup_vs_mixlora"]
    floor = torch_entry["vs_T_dense"] * DENSE_UNITS * rounds / units
    saved_torch = by_kind[("memory", "torch")]["saved_bytes_per_token"]
    saved_mix = by_kind[("memory", "mixlora")]["saved_bytes_per_token"]
    saved = saved_torch / saved_mix

    def verdict(ok: bool) -> str:
        return "pass" if ok else "miss"

    return [
        str(rounds), f"{paired['lora_dropout']:g}", str(recompute),
        f"{torch_entry['median_s']:.3f} s", f"{mix['median_s']:.3f} s",
        f"{entries['reference']['median_s']:.3f} s", f"{entries['dense']['median_s']:.3f} s",
        f"{speedup:.2f}× ({verdict(speedup >= TARGET_VS_MIXLORA)})",
        f"{floor:.2f} of {units} units ({verdict(floor <= TARGET_OWN_FLOOR)})",
        f"{saved_torch / 1024:.1f} / {saved_mix / 1024:.1f} KiB = {saved:.2f} "
        f"({verdict(saved <= TARGET_SAVED_RATIO)})",
        str(torch_entry["rounds"]),
    ]


def render(paths: list[Path]) -> str:
    header = ["T", "dropout", "recompute", "torch", "MixLoRA-style", "reference", "dense",
              f"torch vs MixLoRA (≥ {TARGET_VS_MIXLORA:g}×)",
              f"torch vs own floor (≤ {TARGET_OWN_FLOOR:g})",
              f"saved per token: torch / MixLoRA (≤ {TARGET_SAVED_RATIO:g})", "rounds"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for path in paths:
        lines.append("| " + " | ".join(_row(json.loads(path.read_text()))) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="write the table here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text = render(args.runs)
    except (OSError, ValueError, KeyError) as err:
        print(f"peers_report: {err!r}: not a JSON of the paired and memory benchmarks",
              file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
