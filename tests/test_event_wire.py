"""service/event_wire.c against the protobuf runtime: for any event rows, the
C encoder must write exactly the bytes protobuf serialises for the same
StreamEventsResponse, and cut batches where its budget says."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderstream.events.v1 import event_service_pb2
from service.event_wire import encode_events

# google.protobuf.Timestamp's range, 0001-01-01 to 9999-12-31, in microseconds.
MIN_TIME_US = -62_135_596_800_000_000
MAX_TIME_US = 253_402_300_799_999_999

texts = st.text(max_size=40)  # empty, ASCII and not, astral planes included
rows = st.tuples(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    texts,
    texts,
    texts,
    st.one_of(
        st.integers(min_value=MIN_TIME_US, max_value=MAX_TIME_US),
        st.sampled_from([0, -1, 1, 999_999, 1_000_000, -1_000_000, -1_000_001]),
    ),
    st.one_of(texts, st.text(min_size=200, max_size=400)),  # lengths of 1 and 2 varint bytes
)


def protobuf_bytes(events: list[tuple]) -> bytes:
    """What the protobuf runtime writes: the service's former hot loop."""
    response = event_service_pb2.StreamEventsResponse()
    for ident, kind, source, subject, time_us, payload in events:
        event = response.events.add(
            id=ident, type=kind, source=source, subject=subject, json_payload=payload
        )
        stamp = event.time
        stamp.seconds, micros = divmod(time_us, 1_000_000)
        stamp.nanos = micros * 1000
    return response.SerializeToString()


@settings(derandomize=True, max_examples=400)
@given(st.lists(rows, max_size=8))
def test_bytes_are_what_protobuf_writes(events):
    encoded, end = encode_events(events, 0, 1 << 30)
    assert end == len(events)
    assert encoded == protobuf_bytes(events)


@settings(derandomize=True, max_examples=200)
@given(st.lists(rows, min_size=1, max_size=12), st.integers(min_value=1, max_value=600))
def test_budget_cuts_batches_that_join_into_the_whole(events, budget):
    chunks, start = [], 0
    while start < len(events):
        chunk, end = encode_events(events, start, budget)
        assert end > start  # at least one row, however small the budget
        # It stops at the first row that reaches the budget, not before.
        assert len(chunk) >= budget or end == len(events)
        assert len(encode_events(events[start : end - 1], 0, 1 << 30)[0]) < budget
        chunks.append(chunk)
        start = end
    assert b"".join(chunks) == protobuf_bytes(events)
    parsed = event_service_pb2.StreamEventsResponse.FromString(b"".join(chunks))
    assert [event.id for event in parsed.events] == [row[0] for row in events]


def test_encodes_from_a_start_index():
    events = [(n, "t", "/s", "", n * 1_000_000, "{}") for n in range(1, 6)]
    encoded, end = encode_events(events, 3, 1 << 20)
    assert end == 5
    assert encoded == protobuf_bytes(events[3:])
    assert encode_events(events, 5, 1 << 20) == (b"", 5)


@pytest.mark.parametrize(
    ("rows", "start", "budget", "error"),
    [
        ([(1, "t", "/s", "", 0)], 0, 100, ValueError),  # five columns
        ([(1, "t", "/s", None, 0, "{}")], 0, 100, TypeError),  # NULL subject
        ([("1", "t", "/s", "", 0, "{}")], 0, 100, TypeError),  # id as text
        ([(2**63, "t", "/s", "", 0, "{}")], 0, 100, OverflowError),
        ([(1, "t", "/s", "\ud800", 0, "{}")], 0, 100, UnicodeEncodeError),  # lone surrogate
        ([(1, "t", "/s", "", 0, "{}")], 2, 100, IndexError),
        ([(1, "t", "/s", "", 0, "{}")], 0, 0, ValueError),
    ],
)
def test_refuses_what_is_not_an_event_row(rows, start, budget, error):
    with pytest.raises(error):
        encode_events(rows, start, budget)
