"""Every read statement the service issues keeps an index plan once
PostgreSQL has seen it often enough to settle on a plan (issue 21: under
`plan_cache_mode = auto` a prepared statement switches to its generic plan
after five executions, which for a selective filter walked the primary key
over the whole table).

The statements are collected from the service's SQL modules (string
constants that are SELECTs, and every variant of the functions that build
SQL), so a new statement is checked without anyone listing it here; one
whose arguments this module cannot make fails until it is taught.

Each runs seven times on one connection of a pool opened exactly as the
service opens its own (service/db/pool.py), on a few hundred thousand rows
spread as in production (devcluster/sample_data.py), and the plan of the
last execution, as PostgreSQL really ran it (auto_explain, sent back as a
notice), must not scan a table sequentially nor walk a primary key with a
filter. Twice: with the settings of a direct connection, and with those of
a deployment behind PgBouncer in transaction mode (no statement cache, no
startup parameters), whose pool here reaches the cluster directly: the
session PgBouncer serves only the suite's own database.
"""

from __future__ import annotations

import datetime
import enum
import inspect
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from devcluster import sample_data
from devcluster.cluster import Cluster
from service.db.migrate import available_migrations, migrate
from service.db.pool import close_pool, direct_session, open_pool
from service.events import groups
from service.events import sql as events_sql
from service.orders import sql as orders_sql
from service.orders.filters import window_query
from service.settings import Settings
from tests.support.database import admin_ssl_context, scratch_database

SQL_MODULES = (orders_sql, events_sql)
ROWS = 300_000
EXECUTIONS = 7  # past the five custom plans `auto` makes before it may go generic
WALKED = ROWS // 10  # rows a primary-key scan may filter out before it walks the table
TABLES = {"orders", "order_items", "events"}
DAY_US = 86_400_000_000


def _builder_variants(function: Callable[..., str]) -> Iterator[dict[str, Any]]:
    """Every call of an SQL-building function: each keyword flag both ways,
    and `filters` as every subset of ListOrders' filters."""
    choices: dict[str, list[Any]] = {}
    for name, parameter in inspect.signature(function, eval_str=True).parameters.items():
        if parameter.annotation is bool:
            choices[name] = [False, True]
        elif isinstance(parameter.annotation, type) and issubclass(parameter.annotation, enum.Enum):
            choices[name] = list(parameter.annotation)
        elif name == "partitions":
            # A stream's own page, and a group member's (service/events/groups.py).
            choices[name] = [0, groups.PARTITIONS]
        elif name == "filters":
            names = list(orders_sql.LIST_FILTERS)
            choices[name] = [
                subset
                for size in range(len(names) + 1)
                for subset in itertools.combinations(names, size)
            ]
        else:
            raise AssertionError(f"{function.__qualname__}: teach test_plans.py its {name!r}")
    for values in itertools.product(*choices.values()):
        yield dict(zip(choices, values, strict=True))


# The unary writes are functions (migration 0012), each called by a SELECT:
# not reads, and planned inside the function with plan_cache_mode = auto.
WRITE_FUNCTIONS = (
    "orders_create",
    "orders_create_batch",
    "orders_update_status",
    "events_publish",
    "events_publish_keyed",
)


def write_functions_called(sql: str) -> set[str]:
    return {function for function in WRITE_FUNCTIONS if f"FROM {function}(" in sql}


def read_statements(modules: tuple[ModuleType, ...] = SQL_MODULES) -> dict[str, tuple[str, Any]]:
    """Label -> (SQL, how it was built) for every read statement in `modules`."""
    found: dict[str, tuple[str, Any]] = {}
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            if (
                isinstance(value, str)
                and value.lstrip().upper().startswith("SELECT")
                and not write_functions_called(value)
            ):
                found[name] = (value, None)
            elif (
                inspect.isfunction(value)
                and value.__module__ == module.__name__
                and inspect.signature(value, eval_str=True).return_annotation is str
            ):
                for kwargs in _builder_variants(value):
                    label = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
                    found[label] = (value(**kwargs), (name, kwargs))
    return found


STATEMENTS = read_statements()


# Rare event types of the sample data for each type filter.
RARE_TYPES = {
    events_sql.Types.ANY: [],
    events_sql.Types.ONE: ["com.example.t12"],
    events_sql.Types.SOME: ["com.example.t12", "com.example.t13"],
    events_sql.Types.MANY: [f"com.example.t{11 + n}" for n in range(events_sql.MERGED_TYPES + 1)],
}


def selective_filters(now: int) -> dict[str, Any]:
    """ListOrders' filters with selective values: a light customer, PENDING,
    the last day before `now` (in microseconds, as the pool's codec has
    timestamps)."""
    return {
        "customer_id": f"c-{ROWS // 10 - 1}",
        "status": "PENDING",
        "created_after": now - DAY_US,
        "created_before": now - DAY_US // 2,
    }


def arguments(
    label: str, built: Any, now: int, ids: tuple[int, int] = (0, orders_sql.NO_END)
) -> list[Any]:
    """Selective values that exist in the sample data (rare enough for an
    index to be right): `selective_filters`, a rare event type, a subject
    with a few events. A listing walks `ids` (after, end): as the service
    walks it, its creation-time window's (sql.window_ids)."""
    filter_values = selective_filters(now)
    constants: dict[str, list[Any]] = {
        "GET_ORDER": [ROWS // 2],
        "GET_ORDERS": [[ROWS // 2, ROWS // 3]],
        "GET_EVENTS": [[ROWS // 2, ROWS // 3]],
        "ORDER_STATE": [ROWS // 2],
        "ORDER_BY_REQUEST_ID": ["no-such-request"],
        "PUBLISH_REQUEST": ["no-such-request"],
        "STATUS_REQUEST": ["no-such-request"],
        "SAFE_HORIZON": [],
        "OVERSIZED_PAYLOADS": [['{"a": 1}']],
    }
    if built is None:
        assert label in constants, f"{label}: teach test_plans.py its arguments"
        return constants[label]
    name, kwargs = built
    if name == "events_page":
        return [
            0,
            ROWS + 1,
            *events_sql.type_filter(RARE_TYPES[kwargs["types"]])[1],
            *([f"orders/{ROWS // 10 - 1}"] if kwargs["with_subject"] else []),
            # One member of four: a quarter of the partitions, so a page in
            # id order reads about four rows for each it keeps.
            *([list(range(groups.PARTITIONS // 4))] if kwargs["partitions"] else []),
            events_sql.PAGE_ROWS,
            events_sql.PAGE_BYTES,
        ]
    if name == "window_ids":
        bounds = kwargs["window"].value
        return [*(filter_values[b] for b in bounds), orders_sql.WINDOW_EDGE_ROWS]
    values = [filter_values[f] for f in kwargs["filters"]]
    # A bounded listing reads up to its window's end; an unbounded one to NO_END.
    after, end = ids
    if kwargs["bounded"] and end == orders_sql.NO_END:
        end = orders_sql.NO_END - 1
    id_values = orders_sql.id_range(after, end if kwargs["bounded"] else orders_sql.NO_END)
    if name == "list_orders":
        return [*values, *id_values, 51]
    if name == "export_page":
        return [*values, *id_values, orders_sql.EXPORT_PAGE_ROWS, orders_sql.EXPORT_PAGE_BYTES]
    raise AssertionError(f"{label}: teach test_plans.py its arguments")


def walks(plan: dict[str, Any]) -> list[str]:
    """The nodes of `plan` that read a range proportional to a table: a
    sequential scan of one, or a primary-key scan that filtered out more
    than WALKED rows (a walk in id order that stops soon is what a page
    in id order should be)."""
    bad: list[str] = []
    if plan.get("Actual Loops") == 0:
        return bad  # planned but never run (a COALESCE or CASE branch not needed)
    node_type = plan.get("Node Type", "")
    if node_type == "Seq Scan" and plan.get("Relation Name") in TABLES:
        bad.append(f"Seq Scan on {plan['Relation Name']}")
    if (
        node_type in ("Index Scan", "Index Only Scan")
        and plan.get("Index Name", "").endswith("_pkey")
        and plan.get("Rows Removed by Filter", 0) > WALKED
    ):
        bad.append(f"{node_type} using {plan['Index Name']} with Filter: {plan['Filter']}")
    for child in plan.get("Plans", []):
        bad.extend(walks(child))
    return bad


@pytest.fixture(scope="module")
async def sample_dsn(pg_cluster: Cluster) -> AsyncIterator[str]:
    """A database of its own with ROWS orders and events: a superuser's URL,
    since only a superuser may LOAD auto_explain."""
    async with scratch_database(pg_cluster, "plans") as name:
        dsn = pg_cluster.dsn(admin=True, database=name)
        conn = await asyncpg.connect(dsn, ssl=admin_ssl_context(pg_cluster))
        try:
            await migrate(conn)
            await sample_data.fill(conn, orders=ROWS, events=ROWS, total=ROWS)
        finally:
            await conn.close()
        yield dsn


ROUTES = {
    "direct": {},
    # What the pool does behind PgBouncer in transaction mode; the direct
    # URL is the same database (migrations only).
    "pgbouncer": {"ORDERSTREAM_TRANSACTION_POOLING": "1"},
}


@pytest.fixture(scope="module", params=list(ROUTES))
async def pooled(
    request: pytest.FixtureRequest, pg_cluster: Cluster, sample_dsn: str
) -> AsyncIterator[asyncpg.Connection]:
    """One connection of a pool opened as the service opens its own, with
    auto_explain sending the plan of every statement back as a notice."""
    env = {
        "DATABASE_URL": sample_dsn,
        "PGSSLROOTCERT": str(pg_cluster.certificates.ca_cert),
        **ROUTES[request.param],
    }
    if request.param == "pgbouncer":
        env["ORDERSTREAM_DIRECT_DATABASE_URL"] = sample_dsn
    settings = Settings.from_env(env)
    async with direct_session(settings) as conn:
        await migrate(conn)  # nothing left to apply: proves the route's settings connect
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "LOAD 'auto_explain';"
                " SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_level = notice;"
                " SET auto_explain.log_analyze = on;"
                " SET auto_explain.log_timing = off;"
                " SET auto_explain.log_format = json"
            )
            yield conn
    finally:
        await close_pool(pool, timeout=10)


def listing_filters(built: Any, now: int) -> dict[str, Any]:
    """The filters of a built listing statement, with their values."""
    name, kwargs = built
    if name not in ("list_orders", "export_page"):
        return {}
    values = selective_filters(now)
    return {f: values[f] for f in kwargs["filters"]}


LABELS = sorted(STATEMENTS)


@pytest.mark.parametrize("label", LABELS)
async def test_a_read_statement_keeps_an_index_plan(pooled: asyncpg.Connection, label: str):
    sql, built = STATEMENTS[label]
    now = round(sample_data.created_time(ROWS) * 1e6)
    ids = (0, orders_sql.NO_END)
    if built is not None and (window := window_query(listing_filters(built, now))):
        row = await pooled.fetchrow(window[0], *window[1])
        ids = (row["after"], row["end_id"])
    args = arguments(label, built, now, ids)
    notices: list[str] = []

    def collect(_: object, message: asyncpg.PostgresLogMessage) -> None:
        notices.append(message.message)

    pooled.add_log_listener(collect)
    try:
        for _ in range(EXECUTIONS):
            notices.clear()
            await pooled.fetch(sql, *args)
    finally:
        pooled.remove_log_listener(collect)
    plans = [json.loads(n.split("plan:", 1)[1]) for n in notices if "plan:" in n]
    assert plans, f"no plan came back for {label}: {notices}"
    assert walks(plans[-1]["Plan"]) == [], json.dumps(plans[-1]["Plan"], indent=1)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


@pytest.mark.parametrize("listing", ["list_orders", "export_page"])
async def test_a_first_page_without_statistics_walks_the_primary_key(
    pooled: asyncpg.Connection, listing: str
):
    """A table that is new, or grew since autovacuum last analysed it, has
    no column statistics; PostgreSQL then took the first page's two-sided
    id range (0 to NO_END) for 0.5% of the rows, and read and sorted the
    whole table to return a page. Temporary copies of the tables (searched
    before the real ones, never analysed) with 9,200 orders stand in for
    one; the first page must stop reading orders soon after its last."""
    transaction = pooled.transaction()
    await transaction.start()
    notices: list[str] = []

    def collect(_: object, message: asyncpg.PostgresLogMessage) -> None:
        notices.append(message.message)

    pooled.add_log_listener(collect)
    try:
        await pooled.execute(
            "CREATE TEMP TABLE orders (LIKE public.orders INCLUDING ALL);"
            " CREATE TEMP TABLE order_items (LIKE public.order_items INCLUDING ALL);"
            " INSERT INTO orders (customer_id, currency, total_cents)"
            "   SELECT 'c-' || n % 100, 'EUR', 100 FROM generate_series(1, 9200) AS n;"
            " INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents)"
            "   SELECT id, 1, 'sku', 1, 100 FROM orders"
        )
        first_page = orders_sql.id_range(0, orders_sql.NO_END)
        if listing == "list_orders":
            statement = orders_sql.list_orders((), bounded=False)
            args = [*first_page, 51]
        else:
            statement = orders_sql.export_page((), bounded=False)
            args = [*first_page, 51, orders_sql.EXPORT_PAGE_BYTES]
        # A text of its own: a statement prepared before would still name
        # the real tables.
        notices.clear()
        rows = await pooled.fetch(statement + "-- on temporary tables", *args)
    finally:
        await transaction.rollback()
        pooled.remove_log_listener(collect)
    assert len(rows) == 51
    plans = [json.loads(n.split("plan:", 1)[1]) for n in notices if "plan:" in n]
    assert plans, notices
    read = [n for n in nodes(plans[-1]["Plan"]) if n.get("Relation Name") == "orders"]
    assert read and all(n["Actual Rows"] <= 52 for n in read), json.dumps(plans[-1], indent=1)


def test_statements_are_collected_from_the_sql_modules():
    """The collection sees the statements the issue named, in every variant."""
    assert "GET_ORDER" in STATEMENTS and "SAFE_HORIZON" in STATEMENTS
    assert "events_page(types=Types.SOME, with_subject=True, partitions=0)" in STATEMENTS
    assert "events_page(types=Types.ANY, with_subject=False, partitions=16)" in STATEMENTS
    assert sum(label.startswith("list_orders(") for label in STATEMENTS) == 32
    assert not any(
        sql.lstrip().upper().startswith(("INSERT", "WITH")) for sql, _ in STATEMENTS.values()
    )
    assert "CREATE_ORDER" not in STATEMENTS and "PUBLISH_EVENTS" not in STATEMENTS


async def test_the_writes_are_planned_as_postgresql_would_by_default(
    pooled: asyncpg.Connection,
):
    """Each write function puts plan_cache_mode back to `auto` for its own
    statements: under the pool's force_custom_plan they would be planned on
    every call, for plans that cannot depend on the values written. And the
    service calls each of them, so none is left behind unused."""
    settings = dict(
        await pooled.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE proname = ANY($1::text[])",
            list(WRITE_FUNCTIONS),
        )
    )
    assert settings == {function: ["plan_cache_mode=auto"] for function in WRITE_FUNCTIONS}
    called = set().union(
        *(
            write_functions_called(value)
            for module in SQL_MODULES
            for value in vars(module).values()
            if isinstance(value, str)
        )
    )
    assert called == set(WRITE_FUNCTIONS)


async def test_a_creation_window_is_walked_between_its_first_and_last_ids(
    sample_dsn: str, pg_cluster: Cluster
):
    """`window_ids` finds the window's smallest and largest ids exactly, at
    the table's ends in id order or from the creation-time index: the
    sample's creation times carry an hour's jitter, so ids and times
    disagree near every bound. A bound still ahead of the clock does not
    end the walk: orders created later belong to the window."""
    conn = await asyncpg.connect(sample_dsn, ssl=admin_ssl_context(pg_cluster))
    try:
        first = sample_data.created_time(0)
        end = sample_data.created_time(ROWS)
        edges = [first, first + 3600, (first + end) / 2, end - 86400, end - 3600, end + 86400]
        moments = [datetime.datetime.fromtimestamp(t, datetime.UTC) for t in edges]
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
        for after, before in [
            *((a, None) for a in moments),
            *((None, b) for b in [*moments, future]),
            *((a, a + datetime.timedelta(hours=12)) for a in moments),
        ]:
            bounds = [b for b in (after, before) if b is not None]
            conditions = []
            if after is not None:
                conditions.append("create_time >= $1")
            if before is not None:
                conditions.append(f"create_time < ${len(bounds)}")
            lowest, highest = await conn.fetchrow(
                f"SELECT min(id), max(id) FROM orders WHERE {' AND '.join(conditions)}", *bounds
            )
            # NULL where the window is empty and its bound is computed.
            expected = (
                0 if after is None else None if lowest is None else lowest - 1,
                orders_sql.NO_END if before in (None, future) else highest,
            )
            statement = orders_sql.window_ids(
                orders_sql.Window.BOTH
                if after and before
                else orders_sql.Window.AFTER
                if after
                else orders_sql.Window.BEFORE
            )
            for edge in (1, ROWS):
                found = tuple(await conn.fetchrow(statement, *bounds, edge))
                assert found == expected, (after, before, edge)
    finally:
        await conn.close()


def test_the_partition_statistics_are_on_the_statements_expression():
    """Migration 0011's statistics help only while their expression is the
    one a group member's page filters by."""
    (migration,) = [m for m in available_migrations() if m.version == 11]
    assert events_sql.PARTITION_OF_SUBJECT.format(partitions=groups.PARTITIONS) in migration.sql
