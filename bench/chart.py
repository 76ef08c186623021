"""The unary benchmark as one PNG: throughput (top) and p99 latency (bottom)
against concurrency, one column per method, orderstream beside the ceiling
and the peer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

STYLES = {
    "ceiling": {"label": "ceiling: bare grpc.aio, no database", "color": "#888888", "ls": "--"},
    "orderstream": {"label": "orderstream (grpc.aio + asyncpg)", "color": "#1f6fb4", "ls": "-"},
    "peer": {"label": "peer: sync grpc + psycopg 3 pool", "color": "#e07b1a", "ls": "-"},
}
TITLES = {
    "GetOrder": "GetOrder (h2load)",
    "CreateOrder": "CreateOrder, 3 items (Python client)",
    "ListOrders": "ListOrders, page of 50 (h2load)",
}


def draw(results: dict[str, Any], path: Path) -> Path:
    methods = list(next(iter(results["unary"].values())))
    figure, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 7), sharex=True)
    for column, method in enumerate(methods):
        top, bottom = axes[0][column], axes[1][column]
        for server, style in STYLES.items():
            points = results["unary"][server][method]
            x = [p["concurrency"] for p in points]
            kwargs = {"color": style["color"], "ls": style["ls"], "marker": "o"}
            top.plot(x, [p["rps"] for p in points], label=style["label"], **kwargs)
            bottom.plot(x, [p["p99_ms"] for p in points], **kwargs)
        top.set_title(TITLES.get(method, method))
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(results["concurrency"], [str(c) for c in results["concurrency"]])
        bottom.set_xlabel("concurrent requests")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("calls per second")
    axes[1][0].set_ylabel("p99 latency (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    figure.suptitle(
        f"Unary calls, {results['machine']['cpus']} CPUs, {results['machine']['date']} UTC "
        "(server on CPU 0; PostgreSQL and load generator on CPU 1)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
