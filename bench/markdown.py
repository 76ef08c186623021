"""Renders bench/results/unary.json as the tables of docs/benchmarks.md.

python -m bench.markdown [bench/results/unary.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.harness import RESULTS
from bench.unary import HEADLINE, LABELS, METHODS, SERVERS, UNTARGETED, at, verdict


def figures(results: dict[str, Any]) -> list[str]:
    concurrency = results["concurrency"]
    header = "| method | server | " + " | ".join(f"calls/s, p99 ms at {c}" for c in concurrency)
    header += f" | server CPU µs/call at {HEADLINE}"
    lines = [header + " |", "|---|---|" + "---:|" * (len(concurrency) + 1)]
    for method in METHODS:
        for server in SERVERS:
            cells = [
                f"{p['rps']:,.0f}, {p['p99_ms']:.1f}"
                for p in (at(results["unary"][server][method], c) for c in concurrency)
            ]
            cpu = at(results["unary"][server][method], HEADLINE)["server_cpu_us_per_call"]
            lines.append(f"| `{method}` | {server} | " + " | ".join(cells) + f" | {cpu:,.0f} |")
    pgbench = " | ".join(f"{at(results['pgbench'], c)['rps']:,.0f}, -" for c in concurrency)
    lines.append(f"| `pgbench -S -M prepared` | PostgreSQL | {pgbench} | - |")
    return lines


def ratios(results: dict[str, Any]) -> list[str]:
    lines = ["| ratio | measured | target | |", "|---|---:|---:|---|"]
    for key, label in LABELS.items():
        value = results["ratios"][key]
        bound, met = verdict(key, value)
        lines.append(f"| {label} | {value:.2f} | {bound} | {'met' if met else '**not met**'} |")
    for key, label in UNTARGETED.items():
        lines.append(f"| {label} | {results['ratios'][key]:.2f} | (no target) | |")
    return lines


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "unary.json"
    results = json.loads(path.read_text())
    print("\n".join([*figures(results), "", *ratios(results)]))


if __name__ == "__main__":
    main()
