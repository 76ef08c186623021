"""The README's buf curl examples, run verbatim (port aside) against a
service on a fresh database, as they would run against `make run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devcluster.cluster import create_database
from tests.support.apps import running_app
from tests.support.requests import unique
from tests.support.shell import run_shell

REPO = Path(__file__).resolve().parents[1]


def json_values(text: str) -> list[object]:
    """The JSON documents printed one after another (one per stream message)."""
    decoder, values, rest = json.JSONDecoder(), [], text.strip()
    while rest:
        value, end = decoder.raw_decode(rest)
        values.append(value)
        rest = rest[end:].lstrip()
    return values


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith("npx buf curl ")]


@pytest.mark.slow
async def test_readme_buf_curl_examples_work(service_env, pg_cluster):
    commands = readme_commands()
    assert len(commands) == 10
    database = await create_database(pg_cluster, unique("readme").replace("-", "_"))
    url = pg_cluster.dsn(database=database)
    async with running_app(service_env, DATABASE_URL=url) as app:
        outputs = []
        for command in commands:
            local = command.replace("localhost:50051", f"127.0.0.1:{app.port}")
            code, out, err = await run_shell(local)
            assert code == 0, f"{command}\n{out}\n{err}"
            outputs.append(out)

    services, methods, described, created, fetched, paid, listed, published = outputs[:8]
    streamed, uploaded = outputs[8:]
    assert "orderstream.orders.v1.OrderService" in services.split()
    assert "orderstream.events.v1.EventService/PublishEvents" in methods.split()
    assert json.loads(created)["id"] == "1"
    assert json.loads(fetched) == json.loads(created)
    assert json.loads(paid)["status"] == "ORDER_STATUS_PAID"
    assert [o["id"] for o in json.loads(listed)["orders"]] == ["1"]
    assert len(json.loads(published)["ids"]) == 1
    assert re.fullmatch(r"\d+", json.loads(published)["ids"][0])
    assert json.loads(described) == {
        "name": "CreateOrder",
        "inputType": ".orderstream.orders.v1.CreateOrderRequest",
        "outputType": ".orderstream.orders.v1.Order",
    }
    streamed_events = [e for message in json_values(streamed) for e in message["events"]]
    assert [e["type"] for e in streamed_events] == [
        "order.created",
        "order.status_changed",
        "com.example.paid",
    ]
    assert json.loads(uploaded) == {"eventCount": "2", "firstEventId": "4", "lastEventId": "5"}
