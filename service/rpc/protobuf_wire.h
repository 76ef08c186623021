/*
 * Protobuf wire-format primitives for the service's C encoders
 * (service/events/wire.c, service/orders/wire.c), which write response
 * messages straight from database rows instead of through the protobuf
 * Python API (docs/benchmarks.md says what that saves).
 *
 * The encoders must write exactly what the protobuf runtime serialises for
 * the same message, so these follow its rules: proto3 scalars are left out
 * at their zero value; int64 and int32 values below zero take ten bytes (two's
 * complement, sign-extended); a sub-message once set is written even when
 * empty.
 */

#ifndef ORDERSTREAM_PROTOBUF_WIRE_H
#define ORDERSTREAM_PROTOBUF_WIRE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { WIRE_VARINT = 0, WIRE_LEN = 2 };

#define TAG(field, wire) ((uint8_t)(((field) << 3) | (wire)))
#define MICROS_PER_SECOND 1000000LL

typedef struct {
    const char *data;
    Py_ssize_t size;
} Text;

typedef struct {
    char *data;
    size_t size, capacity;
} Buffer;

/* google.protobuf.Timestamp: seconds rounded down, nanos in [0, 1e9), as
 * Python's divmod splits microseconds. */
typedef struct {
    long long seconds;
    long nanos;
} Stamp;

static inline size_t varint_size(uint64_t value) {
    size_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

static inline char *put_varint(char *out, uint64_t value) {
    while (value >= 0x80) {
        *out++ = (char)((value & 0x7f) | 0x80);
        value >>= 7;
    }
    *out++ = (char)value;
    return out;
}

/* A length-delimited field's whole size: tag, length, body. */
static inline size_t len_field_size(size_t body) { return 1 + varint_size(body) + body; }

static inline size_t int64_field_size(long long value) {
    return value ? 1 + varint_size((uint64_t)value) : 0;
}

static inline size_t text_field_size(Text text) {
    return text.size ? len_field_size((size_t)text.size) : 0;
}

static inline char *put_int64_field(char *out, uint8_t tag, long long value) {
    if (!value) {
        return out;
    }
    *out++ = (char)tag;
    return put_varint(out, (uint64_t)value);
}

static inline char *put_len(char *out, uint8_t tag, size_t body) {
    *out++ = (char)tag;
    return put_varint(out, body);
}

static inline char *put_text(char *out, uint8_t tag, Text text) {
    out = put_len(out, tag, (size_t)text.size);
    memcpy(out, text.data, (size_t)text.size);
    return out + text.size;
}

static inline char *put_text_field(char *out, uint8_t tag, Text text) {
    return text.size ? put_text(out, tag, text) : out;
}

static inline Stamp stamp_of(long long micros_since_epoch) {
    Stamp stamp = {micros_since_epoch / MICROS_PER_SECOND, 0};
    long long micros = micros_since_epoch % MICROS_PER_SECOND;
    if (micros < 0) {
        micros += MICROS_PER_SECOND;
        stamp.seconds -= 1;
    }
    stamp.nanos = (long)(micros * 1000);
    return stamp;
}

static inline size_t stamp_size(Stamp stamp) {
    return int64_field_size(stamp.seconds) + int64_field_size(stamp.nanos);
}

/* A Timestamp field, written even at zero (fields 1 seconds, 2 nanos). */
static inline char *put_stamp_field(char *out, uint8_t tag, Stamp stamp) {
    out = put_len(out, tag, stamp_size(stamp));
    out = put_int64_field(out, TAG(1, WIRE_VARINT), stamp.seconds);
    return put_int64_field(out, TAG(2, WIRE_VARINT), stamp.nanos);
}

/* `value` (owned by the caller) as UTF-8; `what` names it in the error. */
static inline int text_of(PyObject *value, const char *what, Text *text) {
    if (!PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(value)->tp_name);
        return -1;
    }
    /* UTF-8 is cached on the str object; for ASCII text it is the str itself. */
    text->data = PyUnicode_AsUTF8AndSize(value, &text->size);
    return text->data == NULL ? -1 : 0;
}

static inline int int_of(PyObject *value, long long *number) {
    *number = PyLong_AsLongLong(value);
    return (*number == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Item `index` of `sequence` as a number. */
static inline int read_int(PyObject *sequence, Py_ssize_t index, long long *number) {
    PyObject *value = PySequence_GetItem(sequence, index);
    if (value == NULL) {
        return -1;
    }
    int failed = int_of(value, number);
    Py_DECREF(value);
    return failed;
}

/* Item `index` of `sequence` as text; `*keep` then owns the str, and so
 * the UTF-8, until the caller releases it. */
static inline int read_text(PyObject *sequence, Py_ssize_t index, const char *what, Text *text,
                            PyObject **keep) {
    PyObject *value = PySequence_GetItem(sequence, index);
    if (value == NULL) {
        return -1;
    }
    *keep = value;
    return text_of(value, what, text);
}

/* Room for `more` bytes after what `buffer` holds. */
static inline int reserve(Buffer *buffer, size_t more) {
    if (buffer->size + more <= buffer->capacity) {
        return 0;
    }
    size_t capacity = buffer->capacity ? buffer->capacity : 16 * 1024;
    while (capacity < buffer->size + more) {
        capacity *= 2;
    }
    char *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

/* The row count of `rows` for an encoder that fills a message from row
 * `start`, `used` bytes of its `budget` taken: -1 with an exception set
 * when the arguments make no sense. */
static inline Py_ssize_t rows_within_budget(PyObject *rows, Py_ssize_t start, Py_ssize_t used,
                                            Py_ssize_t budget) {
    Py_ssize_t count = PySequence_Size(rows);
    if (count < 0) {
        return -1;
    }
    if (start < 0 || start > count) {
        PyErr_Format(PyExc_IndexError, "start %zd is outside 0..%zd", start, count);
        return -1;
    }
    if (used < 0 || budget <= 0) {
        PyErr_Format(PyExc_ValueError, "need used >= 0 and budget > 0, got %zd and %zd", used,
                     budget);
        return -1;
    }
    return count;
}

#endif
