"""What the client-streamed loads share (service/streams/loads.py), run
against each of them over a real channel: the idempotency key, all or
nothing whatever ends the stream, and the stream limit. What only one of
them does is in tests/test_uploads.py and tests/test_imports.py."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from service.app import App
from tests.support.apps import app_with_channel, pool_is_full
from tests.support.database import (
    copy_running,
    nothing_left_running,
    some_rows_copied,
    table_counts,
    waiting_on_lock,
)
from tests.support.loaders import LOADERS, Loader
from tests.support.polling import eventually
from tests.support.requests import stream, unique
from tests.support.shell import run_shell
from tests.support.status import rpc_error

pytestmark = pytest.mark.through_pgbouncer

loaders = pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.rpc)


@loaders
@pytest.mark.parametrize("case", ["empty-stream", "missing", "too-long", "nul", "changed"], ids=str)
async def test_key_is_required_first_and_unchanged(channel, admin_db, loader: Loader, case):
    item = loader.item()
    key = unique(loader.key_name)
    requests, field = {
        "empty-stream": ([], "messages"),
        "missing": ([loader.request("", [item])], f"messages[0].{loader.key_name}"),
        "too-long": ([loader.request("k" * 129, [item])], f"messages[0].{loader.key_name}"),
        "nul": ([loader.request("a\x00b", [item])], f"messages[0].{loader.key_name}"),
        "changed": (
            [
                loader.request(key, [item]),
                loader.request("", [item]),
                loader.request("other", [item]),
            ],
            f"messages[2].{loader.key_name}",
        ),
    }[case]
    before = await table_counts(admin_db)
    error = await rpc_error(loader.load(channel, requests))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [field]
    assert await table_counts(admin_db) == before
    assert await loader.stored(admin_db, key) is None


@loaders
async def test_response_and_stored_key_give_the_loaded_id_range(channel, admin_db, loader: Loader):
    """Count, first and last id of the rows loaded from uneven messages, in
    the response and in the key's stored row alike."""
    tag = unique("tag")
    key = unique(loader.key_name)
    batches = [[loader.tagged(tag)] * size for size in (40, 1, 0, 25)]
    response = await loader.load(channel, loader.messages(key, batches))

    assert loader.id_range(response) == await loader.tagged_id_range(admin_db, tag)
    assert loader.count(response) == 66
    stored = await loader.stored(admin_db, key)
    assert type(response)(**{name: stored[name] for name in loader.id_range_fields}) == response


@loaders
async def test_load_of_no_items_is_recorded(channel, admin_db, loader: Loader):
    key = unique(loader.key_name)
    before = await table_counts(admin_db)
    response = await loader.load(channel, [loader.request(key), loader.request()])
    assert response == type(response)()
    assert await table_counts(admin_db) == before
    assert (await loader.stored(admin_db, key))[loader.count_field] == 0
    again = await loader.load(channel, loader.messages(key, [[loader.item()]]))
    assert again == response
    assert await table_counts(admin_db) == before


BAD_ITEMS = [
    pytest.param(loader, fields, field, id=f"{loader.rpc}-{field}-{n}")
    for loader in LOADERS
    for n, (fields, field) in enumerate(loader.bad_items)
]


@pytest.mark.parametrize(("loader", "fields", "field"), BAD_ITEMS)
async def test_one_bad_item_rejects_the_whole_load(
    channel, admin_db, loader: Loader, fields, field
):
    before = await table_counts(admin_db)
    key = unique(loader.key_name)
    batches = [[loader.item() for _ in range(4)] for _ in range(3)]
    batches[1][2] = loader.item(**fields)
    error = await rpc_error(loader.load(channel, loader.messages(key, batches)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.error_info.reason == "INVALID_FIELD"
    bad = f"messages[1].{loader.items}[2]."
    assert f"{bad}{field}" in error.violations, error.violations
    assert all(name.startswith(bad) for name in error.violations), error.violations
    assert await table_counts(admin_db) == before
    assert await loader.stored(admin_db, key) is None


FAR_BAD_ITEMS = [
    pytest.param(loader, fields, field, id=f"{loader.rpc}-{field}")
    for loader in LOADERS
    for fields, field in loader.far_bad_items
]


@pytest.mark.parametrize(("loader", "fields", "field"), FAR_BAD_ITEMS)
async def test_bad_item_is_located_across_uneven_messages(
    channel, admin_db, loader: Loader, fields, field
):
    before = await table_counts(admin_db)
    sizes = (3, 0, 7, 7, 7, 2, 500, 500, 1)
    batches = [[loader.item() for _ in range(size)] for size in sizes]
    batches[7][321] = loader.item(**fields)
    error = await rpc_error(loader.load(channel, loader.messages(unique(loader.key_name), batches)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [f"messages[7].{loader.items}[321].{field}"]
    assert await table_counts(admin_db) == before


@loaders
async def test_retry_after_commit_returns_the_first_response(channel, admin_db, loader: Loader):
    key = unique(loader.key_name)
    tag = unique("tag")
    first = await loader.load(channel, loader.messages(key, [[loader.tagged(tag)] * 5] * 2))
    before = await table_counts(admin_db)
    # Same key, other items: the stored response, nothing written.
    retried = await loader.load(channel, loader.messages(key, [[loader.tagged(unique("tag"))] * 2]))
    assert retried == first
    assert loader.count(first) == 10
    assert await table_counts(admin_db) == before
    assert await loader.tagged_rows(admin_db, tag) == 10


@loaders
async def test_retry_after_commit_is_held_to_its_key(channel, admin_db, loader: Loader):
    """A retry's stream is read to its end, under the rules of a load's."""
    key = unique(loader.key_name)
    await loader.load(channel, loader.messages(key, [[loader.item()]]))
    before = await table_counts(admin_db)
    retry = [loader.request(key, [loader.item()]), loader.request("other", [loader.item()])]
    error = await rpc_error(loader.load(channel, retry))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(error.violations) == [f"messages[1].{loader.key_name}"]
    assert await table_counts(admin_db) == before


@pytest.mark.slow
@loaders
async def test_buf_curl_retries_of_a_committed_load_get_its_response(
    app, admin_db, loader: Loader, tmp_path
):
    """buf curl sends its whole stream before it reads the answer: a retry
    answered after its first message failed with `write envelope: EOF`."""
    key = unique(loader.key_name)
    tag = unique("tag")
    body = tmp_path / "requests.json"
    messages = loader.messages(key, [[loader.tagged(tag)] * 1000] * 3)
    body.write_text("\n".join(json_format.MessageToJson(message) for message in messages))
    command = (
        f"npx buf curl --protocol grpc --http2-prior-knowledge -d @{body} "
        f"http://127.0.0.1:{app.port}{loader.path}"
    )
    answers = []
    for _ in range(3):
        code, out, err = await run_shell(command)
        assert code == 0, err
        answers.append(json.loads(out))
    count = re.sub(r"_(\w)", lambda letter: letter[1].upper(), loader.count_field)
    assert answers[0][count] == "3000"
    assert answers == [answers[0]] * 3
    assert await loader.tagged_rows(admin_db, tag) == 3000


async def _second_load_waiting(channel, admin_db, loader: Loader, key: str, tag_b: str):
    """Starts a load that must wait for the claim of the one already copying."""
    await eventually(lambda: copy_running(admin_db), what="the first load to start its COPY")
    call_b = loader.method(channel)(stream(loader.messages(key, [[loader.tagged(tag_b)] * 30])))
    await eventually(
        lambda: waiting_on_lock(admin_db, f"INSERT INTO {loader.key_table}"),
        what="the second load to wait for the first's claim",
    )
    return call_b


@loaders
async def test_concurrent_loads_with_one_key_commit_once(channel, admin_db, app, loader: Loader):
    """The second waits for the first's claim and returns its response."""
    key = unique(loader.key_name)
    tag_a, tag_b = unique("tag-a"), unique("tag-b")
    call_a = loader.method(channel)()
    await call_a.write(loader.request(key, [loader.tagged(tag_a)] * 50))
    call_b = await _second_load_waiting(channel, admin_db, loader, key, tag_b)
    await call_a.write(loader.request("", [loader.tagged(tag_a)] * 50))
    await call_a.done_writing()
    response_a = await call_a
    response_b = await call_b

    assert loader.count(response_a) == 100
    assert response_b == response_a
    assert await loader.tagged_rows(admin_db, tag_a) == 100
    assert await loader.tagged_rows(admin_db, tag_b) == 0
    await eventually(lambda: pool_is_full(app), what="connections to return")


@loaders
async def test_concurrent_load_loads_its_own_items_when_the_first_fails(
    channel, admin_db, app, loader: Loader
):
    key = unique(loader.key_name)
    tag_a, tag_b = unique("tag-a"), unique("tag-b")
    call_a = loader.method(channel)()
    await call_a.write(loader.request(key, [loader.tagged(tag_a)] * 50))
    call_b = await _second_load_waiting(channel, admin_db, loader, key, tag_b)
    call_a.cancel()
    response_b = await call_b

    assert await call_a.code() == grpc.StatusCode.CANCELLED
    assert loader.count(response_b) == 30
    assert await loader.tagged_rows(admin_db, tag_a) == 0
    assert await loader.tagged_rows(admin_db, tag_b) == 30
    await eventually(lambda: pool_is_full(app), what="connections to return")


@dataclass(frozen=True)
class HeldLoad:
    app: App
    channel: grpc.aio.Channel
    call: Any  # the load, its COPY started, its stream still open
    key: str


@contextlib.asynccontextmanager
async def _held_load(
    service_env: dict[str, str], admin_db, loader: Loader, **settings: str
) -> AsyncIterator[HeldLoad]:
    """A service of its own with `settings`, running one load of one item
    that waits for the client's next message."""
    async with app_with_channel(service_env, **settings) as (small, channel):
        key = unique(loader.key_name)
        call = loader.method(channel)()
        await call.write(loader.request(key, [loader.item()]))
        await eventually(lambda: copy_running(admin_db), what="the first load to start")
        yield HeldLoad(small, channel, call, key)
        await eventually(lambda: pool_is_full(small), what="connections to return")


@loaders
async def test_waiting_longer_than_the_statement_timeout_is_aborted(
    service_env, admin_db, loader: Loader
):
    async with _held_load(service_env, admin_db, loader, ORDERSTREAM_COMMAND_TIMEOUT="1") as held:
        same_key = loader.messages(held.key, [[loader.item()]])
        error = await rpc_error(loader.load(held.channel, same_key))
        assert error.code == grpc.StatusCode.ABORTED
        assert error.error_info.reason == loader.in_progress
        assert error.retry_info is not None

        await held.call.done_writing()
        first = await held.call
        assert await loader.load(held.channel, same_key) == first


async def _leaves_nothing(admin_db, app, loader: Loader, key: str, before: dict[str, int]):
    await eventually(lambda: pool_is_full(app), what="the connection to return")
    await eventually(lambda: nothing_left_running(admin_db), what="the COPY to end")
    assert await table_counts(admin_db) == before
    assert await loader.stored(admin_db, key) is None


@loaders
async def test_client_cancel_mid_stream_leaves_nothing(channel, admin_db, app, loader: Loader):
    before = await table_counts(admin_db)
    key = unique(loader.key_name)
    call = loader.method(channel)()
    await call.write(loader.request(key, [loader.item()] * 1000))
    # Enough rows that some have reached PostgreSQL (asyncpg sends in chunks).
    for _ in range(19):
        await call.write(loader.request("", [loader.item()] * 1000))
    await eventually(lambda: some_rows_copied(admin_db), what="rows to reach the database")
    call.cancel()

    assert await call.code() == grpc.StatusCode.CANCELLED
    await _leaves_nothing(admin_db, app, loader, key, before)


@loaders
async def test_lost_client_connection_mid_stream_leaves_nothing(admin_db, app, loader: Loader):
    before = await table_counts(admin_db)
    key = unique(loader.key_name)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    call = loader.method(channel)()
    for request in loader.messages(key, [[loader.item()] * 1000] * 20):
        await call.write(request)
    await eventually(lambda: some_rows_copied(admin_db), what="rows to reach the database")
    await channel.close()  # the HTTP/2 connection goes away under the stream

    await _leaves_nothing(admin_db, app, loader, key, before)


@loaders
async def test_deadline_mid_stream_leaves_nothing(channel, admin_db, app, loader: Loader):
    before = await table_counts(admin_db)
    key = unique(loader.key_name)
    call = loader.method(channel)(timeout=5)
    for request in loader.messages(key, [[loader.item()] * 1000] * 20):
        await call.write(request)
    await eventually(lambda: some_rows_copied(admin_db), what="rows to reach the database")
    # The client stalls without half-closing; the deadline ends the load.
    error = await rpc_error(call)

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await _leaves_nothing(admin_db, app, loader, key, before)


@loaders
async def test_loads_beyond_the_stream_limit_are_refused_with_retry_info(
    service_env, admin_db, loader: Loader
):
    async with _held_load(service_env, admin_db, loader, ORDERSTREAM_MAX_STREAMS="1") as held:
        one = loader.messages(unique(loader.key_name), [[loader.item()]])
        error = await rpc_error(loader.load(held.channel, one))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info.reason == "TOO_MANY_STREAMS"
        assert error.retry_info is not None

        await held.call.done_writing()
        assert loader.count(await held.call) == 1
        # The slot is free again.
        again = loader.messages(unique(loader.key_name), [[loader.item()]])
        assert loader.count(await loader.load(held.channel, again)) == 1
