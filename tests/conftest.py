"""Registration and collection hooks only. The fixtures are plugins in
tests/fixtures/ (real resources: a TLS PostgreSQL cluster for the session,
PgBouncer, the service, channels and stubs, the login of a service process);
the helpers test modules share are in tests/support/.

Modules marked `through_pgbouncer` run twice, `[direct]` and `[pgbouncer]`:
the second time the service (`service_env` and everything built on it)
reaches the cluster through a real PgBouncer in transaction mode
(tests/support/pgbouncer.py). `admin_db` always looks at the cluster directly.
"""

from __future__ import annotations

import pytest

pytest_plugins = (
    "tests.fixtures.fix_cluster",
    "tests.fixtures.fix_pgbouncer",
    "tests.fixtures.fix_service",
    "tests.fixtures.fix_processes",
    # The fault suite's and the hostile-input run's figures, in the summary.
    "tests.faults.tally",
    "tests.support.input_tally",
)

DATABASE_ROUTES = ("direct", "pgbouncer")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_route" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "through_pgbouncer"
    ):
        # Session scope: pytest groups the tests by route, so each route's
        # service starts once rather than once per module.
        metafunc.parametrize("database_route", DATABASE_ROUTES, indirect=True, scope="session")
