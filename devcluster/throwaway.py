"""Throwaway clusters: a fresh temporary directory, a cluster in it, and
both gone afterwards. The tests, the fault suite and the benchmarks all
make theirs here."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from devcluster.cluster import Cluster, start_cluster, start_standby, stop_cluster


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A new temporary directory, removed with everything in it afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def throwaway_cluster(
    prefix: str,
    *,
    durable: bool,
    stop_mode: str = "fast",
    standby_of: Cluster | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Cluster]:
    """A TLS cluster in a scratch directory (a hot standby of `standby_of`,
    with extra server `settings`, if given), stopped with `stop_mode` and
    deleted on exit."""
    with scratch_directory(prefix) as base:
        if standby_of is None:
            cluster = start_cluster(base, durable=durable)
        else:
            cluster = start_standby(standby_of, base, durable=durable, settings=settings)
        try:
            yield cluster
        finally:
            stop_cluster(cluster, mode=stop_mode)
