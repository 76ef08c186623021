"""The servers bench.unary compares orderstream with answer what orderstream
answers: the peer (psycopg and a sync grpc.server, running the service's
own SQL) for every method the benchmark drives, and the ceiling with the
responses it was given. A benchmark against a server that fails, or that
answers something else, measures nothing; the SQL the peer borrows changes
with the service's, so this runs with the suite."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from bench.ceiling_server import WAITS
from devcluster.process import served
from orderstream.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tests.support.requests import create_request


async def test_the_peer_answers_as_the_service(service_env, orders):
    customer = f"bench-{uuid.uuid4()}"
    created = await orders.CreateOrder(create_request(customer_id=customer))
    argv = [sys.executable, "-m", "bench.peer_server", "--threads=2"]
    async with (
        served(argv, service_env) as peer,
        grpc.aio.insecure_channel(f"127.0.0.1:{peer.port}") as channel,
    ):
        peer_orders = order_service_pb2_grpc.OrderServiceStub(channel)
        request = order_service_pb2.GetOrderRequest(id=created.id)
        assert await peer_orders.GetOrder(request) == await orders.GetOrder(request)

        # The peer lists every order from the first, as the benchmark asks.
        page = order_service_pb2.ListOrdersRequest(page_size=50)
        listed = await peer_orders.ListOrders(page)
        assert list(listed.orders) == list((await orders.ListOrders(page)).orders)

        made = await peer_orders.CreateOrder(create_request(customer_id=customer))
        assert made.customer_id == customer
        assert made.total_cents == created.total_cents
        assert await orders.GetOrder(order_service_pb2.GetOrderRequest(id=made.id)) == made


@pytest.mark.parametrize("wait", WAITS)
async def test_the_ceiling_answers_with_what_it_was_given(
    orders, service_env, tmp_path: Path, wait: str
):
    """After each of its waits (bench.round_trip measures them all), and
    with the mean batch of the coalesced one written at exit."""
    created = await orders.CreateOrder(create_request())
    page = await orders.ListOrders(order_service_pb2.ListOrdersRequest(page_size=50))
    responses = {
        "GetOrder": created.SerializeToString().hex(),
        "CreateOrder": created.SerializeToString().hex(),
        "ListOrders": page.SerializeToString().hex(),
    }
    canned = tmp_path / "responses.json"
    canned.write_text(json.dumps(responses))
    batch = tmp_path / "batch"
    argv = [
        sys.executable, "-m", "bench.ceiling_server", str(canned),
        "--wait", wait, "--batch-file", str(batch),
    ]  # fmt: skip
    async with (
        served(argv, service_env) as ceiling,
        grpc.aio.insecure_channel(f"127.0.0.1:{ceiling.port}") as channel,
    ):
        canned_orders = order_service_pb2_grpc.OrderServiceStub(channel)
        got = await canned_orders.GetOrder(order_service_pb2.GetOrderRequest(id=created.id))
        assert got == created
        listed = await canned_orders.ListOrders(order_service_pb2.ListOrdersRequest())
        assert listed == page
    if wait == "coalesced":
        assert float(batch.read_text()) >= 1
