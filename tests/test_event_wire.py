"""service/events/wire.c against the protobuf runtime: for any event rows, the
C encoder must write exactly the bytes protobuf serialises for the same
StreamEventsResponse, and fill messages up to their byte budget, never past
it but with an event that alone is larger."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderstream.events.v1 import event_service_pb2
from service.events.wire import encode_events
from tests.support.packing import messages_of

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
    # lengths of 1 and 2 varint bytes; None: left out for its size
    st.one_of(texts, st.text(min_size=200, max_size=400), st.none()),
    # payload_bytes: written as omitted_payload_bytes when the payload is None
    st.one_of(st.integers(min_value=0, max_value=2**62), st.sampled_from([0, 1, 1048577])),
)


def protobuf_bytes(events: list[tuple]) -> bytes:
    """What the protobuf runtime writes: the service's former hot loop."""
    response = event_service_pb2.StreamEventsResponse()
    for ident, kind, source, subject, time_us, payload, payload_bytes in events:
        event = response.events.add(id=ident, type=kind, source=source, subject=subject)
        if payload is None:
            event.omitted_payload_bytes = payload_bytes
        else:
            event.json_payload = payload
        stamp = event.time
        stamp.seconds, micros = divmod(time_us, 1_000_000)
        stamp.nanos = micros * 1000
    return response.SerializeToString()


@settings(derandomize=True, max_examples=400)
@given(st.lists(rows, max_size=8))
def test_bytes_are_what_protobuf_writes(events):
    encoded, end = encode_events(events, 0, 0, 1 << 30)
    assert end == len(events)
    assert encoded == protobuf_bytes(events)


def entry_size(row: tuple) -> int:
    return len(encode_events([row], 0, 0, 1 << 30)[0])


@settings(derandomize=True, max_examples=200)
@given(st.lists(rows, min_size=1, max_size=12), st.integers(min_value=1, max_value=600))
def test_messages_fill_up_to_the_budget_and_join_into_the_whole(events, budget):
    """Drives the encoder as the stream does: a message is sent when the
    next row does not fit in it."""
    messages = messages_of(encode_events, events, budget, entry_size)
    assert b"".join(messages) == protobuf_bytes(events)
    for message in messages:
        parsed = event_service_pb2.StreamEventsResponse.FromString(message)
        assert len(message) <= budget or len(parsed.events) == 1


def test_a_row_that_does_not_fit_is_left_for_the_next_message():
    events = [(n, "t", "/s", "", 0, "x" * 100, 100) for n in range(1, 4)]
    size = entry_size(events[0])
    assert encode_events(events, 0, 1, size) == (b"", 0)
    assert encode_events(events, 0, 0, 2 * size) == (protobuf_bytes(events[:2]), 2)
    assert encode_events(events, 0, 0, 1) == (protobuf_bytes(events[:1]), 1)  # alone, too big


def test_a_payload_left_out_is_written_as_its_size():
    """A row whose payload is over the limit (payload None) keeps its place
    and every other field; omitted_payload_bytes carries the stored size."""
    events = [
        (1, "t", "/s", "a", 5, "{}", 2),
        (2, "t", "/s", "b", 6, None, 14_417_929),
        (3, "t", "/s", "c", 7, '{"n": 1}', 8),
    ]
    encoded, end = encode_events(events, 0, 0, 1 << 20)
    assert (encoded, end) == (protobuf_bytes(events), 3)
    parsed = event_service_pb2.StreamEventsResponse.FromString(encoded).events
    assert [e.WhichOneof("payload") for e in parsed] == ["json_payload", None, "json_payload"]
    assert [e.omitted_payload_bytes for e in parsed] == [0, 14_417_929, 0]
    assert parsed[1].subject == "b"


def test_encodes_from_a_start_index():
    events = [(n, "t", "/s", "", n * 1_000_000, "{}", 2) for n in range(1, 6)]
    encoded, end = encode_events(events, 3, 0, 1 << 20)
    assert end == 5
    assert encoded == protobuf_bytes(events[3:])
    assert encode_events(events, 5, 0, 1 << 20) == (b"", 5)


@pytest.mark.parametrize(
    ("rows", "start", "used", "budget", "error"),
    [
        ([(1, "t", "/s", "", 0, "{}")], 0, 0, 100, ValueError),  # six columns, as before 0004
        ([(1, "t", "/s", None, 0, "{}", 2)], 0, 0, 100, TypeError),  # NULL subject
        ([("1", "t", "/s", "", 0, "{}", 2)], 0, 0, 100, TypeError),  # id as text
        ([(2**63, "t", "/s", "", 0, "{}", 2)], 0, 0, 100, OverflowError),
        ([(1, "t", "/s", "\ud800", 0, "{}", 2)], 0, 0, 100, UnicodeEncodeError),  # surrogate
        ([(1, "t", "/s", "", 0, b"{}", 2)], 0, 0, 100, TypeError),  # payload as bytes
        ([(1, "t", "/s", "", 0, None, None)], 0, 0, 100, TypeError),  # left out, no size
        ([(1, "t", "/s", "", 0, "{}", 2)], 2, 0, 100, IndexError),
        ([(1, "t", "/s", "", 0, "{}", 2)], 0, 0, 0, ValueError),
        ([(1, "t", "/s", "", 0, "{}", 2)], 0, -1, 100, ValueError),
    ],
)
def test_refuses_what_is_not_an_event_row(rows, start, used, budget, error):
    with pytest.raises(error):
        encode_events(rows, start, used, budget)
