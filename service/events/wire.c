/*
 * StreamEvents' hot loop in C: event rows straight to protobuf wire bytes.
 *
 * Building one Event message per row through the protobuf Python API cost
 * about 1.4 us of the service's 2.5-2.8 us per streamed row (the Timestamp
 * sub-message alone 0.6-0.8 us); this writes the same bytes in about 0.1 us,
 * which is what lets a stream keep up with PostgreSQL's own COPY out.
 *
 * encode_events(rows, start, used, budget) -> (bytes, next)
 *
 *   rows    a sequence of rows (asyncpg Records) shaped as
 *           (id int, type str, source str, subject str, time_us int,
 *            json_payload str or None, payload_bytes int), time_us in
 *           microseconds since the Unix epoch; json_payload None when the
 *           stored payload is over the limit (service/events/sql.py), and
 *           then payload_bytes, its size, is written as
 *           `omitted_payload_bytes` (otherwise payload_bytes is not read)
 *   start   the index of the first row to encode
 *   used    bytes already in the message being filled
 *   budget  the most bytes a message may hold
 *
 * Encodes rows from `start` for as long as the message stays within
 * `budget`; a row larger than the budget alone goes into an empty message
 * (used == 0) by itself, so a message exceeds the budget only by holding
 * one such event. The bytes are a run of StreamEventsResponse field 1
 * (`repeated Event events = 1`) entries: any run of them, or several runs
 * joined, is a complete StreamEventsResponse. `next` is the index of the
 * first row not encoded (len(rows) when all were); with next < len(rows),
 * row `next` did not fit, and the message is full.
 *
 * Byte-identical to what the protobuf runtime serialises for the message the
 * Python loop built (tests/test_event_wire.py holds it to that): fields in
 * number order; proto3 scalars omitted at their zero value; `time` always
 * present, since a sub-message is present once set; `json_payload`
 * present whenever set, since it is a member of a oneof (even when empty);
 * `omitted_payload_bytes` (field 8, after it) only when json_payload is not
 * set, omitted at 0 as any proto3 scalar.
 */

#include "../rpc/protobuf_wire.h"

/* Field numbers, from protos/orderstream/events/v1/event.proto. */
enum {
    RESPONSE_EVENTS = 1,
    EVENT_ID = 1,
    EVENT_TYPE = 2,
    EVENT_SOURCE = 3,
    EVENT_SUBJECT = 4,
    EVENT_TIME = 5,
    EVENT_JSON_PAYLOAD = 6,
    EVENT_OMITTED_PAYLOAD_BYTES = 8,
};

#define ROW_COLUMNS 7

typedef struct {
    long long id;
    Text type, source, subject, payload;
    int has_payload;           /* 0: payload left out, omitted_bytes instead */
    long long omitted_bytes;
    Stamp time;
    size_t event_size; /* the Event's body */
} Event;

/* The payload column, or, when it is None (left out for its size), the
 * payload_bytes column after it. */
static int read_payload(PyObject *row, Event *event, PyObject **keep) {
    PyObject *value = PySequence_GetItem(row, 5);
    if (value == NULL) {
        return -1;
    }
    if (value == Py_None) {
        Py_DECREF(value);
        event->has_payload = 0;
        event->payload.data = NULL;
        event->payload.size = 0;
        return read_int(row, 6, &event->omitted_bytes);
    }
    *keep = value;
    event->has_payload = 1;
    event->omitted_bytes = 0;
    return text_of(value, "an event's json_payload", &event->payload);
}

/* Reads one row; `keep` holds the row's str objects, which own the UTF-8. */
static int read_event(PyObject *row, Event *event, PyObject *keep[4]) {
    long long time_us;
    if (PySequence_Size(row) != ROW_COLUMNS) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError,
                            "an event row has 7 columns: id, type, source, subject, time_us, "
                            "json_payload, payload_bytes");
        }
        return -1;
    }
    if (read_int(row, 0, &event->id) ||
        read_text(row, 1, "an event's type", &event->type, &keep[0]) ||
        read_text(row, 2, "an event's source", &event->source, &keep[1]) ||
        read_text(row, 3, "an event's subject", &event->subject, &keep[2]) ||
        read_int(row, 4, &time_us) || read_payload(row, event, &keep[3])) {
        return -1;
    }
    event->time = stamp_of(time_us);
    event->event_size = int64_field_size(event->id) + text_field_size(event->type) +
                        text_field_size(event->source) + text_field_size(event->subject) +
                        len_field_size(stamp_size(event->time)) +
                        (event->has_payload ? len_field_size((size_t)event->payload.size)
                                            : int64_field_size(event->omitted_bytes));
    return 0;
}

static void put_event(Buffer *buffer, const Event *event) {
    char *out = buffer->data + buffer->size;
    out = put_len(out, TAG(RESPONSE_EVENTS, WIRE_LEN), event->event_size);
    out = put_int64_field(out, TAG(EVENT_ID, WIRE_VARINT), event->id);
    out = put_text_field(out, TAG(EVENT_TYPE, WIRE_LEN), event->type);
    out = put_text_field(out, TAG(EVENT_SOURCE, WIRE_LEN), event->source);
    out = put_text_field(out, TAG(EVENT_SUBJECT, WIRE_LEN), event->subject);
    out = put_stamp_field(out, TAG(EVENT_TIME, WIRE_LEN), event->time);
    if (event->has_payload) {
        out = put_text(out, TAG(EVENT_JSON_PAYLOAD, WIRE_LEN), event->payload);
    } else {
        out = put_int64_field(out, TAG(EVENT_OMITTED_PAYLOAD_BYTES, WIRE_VARINT),
                              event->omitted_bytes);
    }
    buffer->size = (size_t)(out - buffer->data);
}

static PyObject *encode_events(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *rows;
    Py_ssize_t start, used, budget;
    if (!PyArg_ParseTuple(args, "Onnn:encode_events", &rows, &start, &used, &budget)) {
        return NULL;
    }
    Py_ssize_t count = rows_within_budget(rows, start, used, budget);
    if (count < 0) {
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    Py_ssize_t next = start;
    while (next < count) {
        PyObject *row = PySequence_GetItem(rows, next);
        if (row == NULL) {
            goto fail;
        }
        Event event;
        PyObject *keep[4] = {NULL, NULL, NULL, NULL};
        int failed = read_event(row, &event, keep);
        int fits = 1;
        if (!failed) {
            /* The whole entry: tag, length, body. */
            size_t entry = len_field_size(event.event_size);
            size_t filled = (size_t)used + buffer.size;
            fits = filled == 0 || filled + entry <= (size_t)budget;
            if (fits) {
                failed = reserve(&buffer, entry);
            }
        }
        if (!failed && fits) {
            put_event(&buffer, &event);
        }
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(keep[i]);
        }
        Py_DECREF(row);
        if (failed) {
            goto fail;
        }
        if (!fits) {
            break;
        }
        next++;
    }
    PyObject *encoded = PyBytes_FromStringAndSize(buffer.data, (Py_ssize_t)buffer.size);
    PyMem_Free(buffer.data);
    if (encoded == NULL) {
        return NULL;
    }
    return Py_BuildValue("(Nn)", encoded, next);

fail:
    PyMem_Free(buffer.data);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_events", encode_events, METH_VARARGS,
     "encode_events(rows, start, used, budget) -> (bytes, next)\n\n"
     "Encodes rows[start:] as StreamEventsResponse `events` entries while the\n"
     "message, `used` bytes so far, stays within `budget` (a row larger than the\n"
     "budget goes alone into an empty message); `next` is the first row not\n"
     "encoded."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "service.events.wire",
    .m_doc = "Event rows to StreamEventsResponse wire bytes (see wire.c).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit_wire(void) { return PyModule_Create(&module); }
