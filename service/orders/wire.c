/*
 * ListOrders' pages, ExportOrders' messages and GetOrder's order in C: order
 * rows straight to wire bytes.
 *
 * Building a page of 50 orders through the protobuf Python API (an Order,
 * its LineItems and two Timestamps per row) and serialising it took about
 * 165 us of the service's 750-830 us of CPU per ListOrders call; this writes
 * the same bytes in a small fraction of that (docs/benchmarks.md).
 *
 * encode_page(rows, count, statuses, next_page_token) -> bytes
 *
 *   rows             a sequence of rows (asyncpg Records) whose first 11
 *                    columns are service/orders/sql.py's _ORDER_COLUMNS:
 *                    (id int, customer_id str, currency str, status str,
 *                     total_cents int, version int, create_time int,
 *                     update_time int, skus list[str], quantities list[int],
 *                     prices list[int]), times in microseconds since the
 *                    Unix epoch; the three item arrays are parallel, and
 *                    None (an order without items) is read as empty
 *   count            how many rows, from the first, the page holds
 *   statuses         the stored status names' OrderStatus values
 *   next_page_token  written as the response's next_page_token ('' for none)
 *
 * encode_orders(rows, start, used, budget, statuses) -> (bytes, next)
 *
 *   The same rows from `start`, for as long as the message being filled
 *   (`used` bytes so far) stays within `budget`; an order larger than the
 *   budget alone goes into an empty message (used == 0) by itself. The
 *   bytes are a run of `repeated Order orders = 1` entries, field 1 of both
 *   ListOrdersResponse and ExportOrdersResponse: runs joined are one
 *   ExportOrdersResponse. `next` is the index of the first row not encoded
 *   (len(rows) when all were); with next < len(rows) the message is full.
 *
 * encode_order(row, statuses) -> bytes
 *
 *   One such row as an Order message by itself: GetOrder's response.
 *
 * Byte-identical to what the protobuf runtime serialises for a
 * ListOrdersResponse of service/orders/convert.py's order_from_row messages,
 * and for one such message alone (tests/test_order_wire.py holds it to
 * that): fields in number order,
 * proto3 scalars omitted at zero, both Timestamps always present.
 */

#include "../rpc/protobuf_wire.h"

/* Field numbers, from protos/orderstream/orders/v1/. */
enum {
    RESPONSE_ORDERS = 1,
    RESPONSE_NEXT_PAGE_TOKEN = 2,
    ORDER_ID = 1,
    ORDER_CUSTOMER_ID = 2,
    ORDER_CURRENCY = 3,
    ORDER_STATUS = 4,
    ORDER_ITEMS = 5,
    ORDER_TOTAL_CENTS = 6,
    ORDER_VERSION = 7,
    ORDER_CREATE_TIME = 8,
    ORDER_UPDATE_TIME = 9,
    ITEM_SKU = 1,
    ITEM_QUANTITY = 2,
    ITEM_UNIT_PRICE_CENTS = 3,
};

#define ORDER_COLUMNS 11
#define TEXT_COLUMNS 3 /* customer_id, currency, status */
#define ARRAY_COLUMNS 3

typedef struct {
    Text sku;
    long long quantity, unit_price_cents;
    size_t size; /* the LineItem's body */
} Item;

typedef struct {
    long long id, status, total_cents, version;
    Text customer_id, currency;
    Stamp create_time, update_time;
    Py_ssize_t item_count;
    size_t size; /* the Order's body */
} Order;

/* The status name's OrderStatus value, from `statuses`. */
static int status_of(PyObject *statuses, PyObject *name, long long *value) {
    PyObject *found = PyDict_GetItemWithError(statuses, name);
    if (found == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, name);
        }
        return -1;
    }
    return int_of(found, value);
}

/* The item arrays as lists or tuples (`arrays` owns them), all of one length. */
static int read_arrays(PyObject *row, PyObject *arrays[ARRAY_COLUMNS], Py_ssize_t *count) {
    static const char *const names[ARRAY_COLUMNS] = {"skus", "quantities", "prices"};
    for (int i = 0; i < ARRAY_COLUMNS; i++) {
        PyObject *value = PySequence_GetItem(row, 8 + i);
        if (value == NULL) {
            return -1;
        }
        if (value == Py_None) {
            arrays[i] = PyTuple_New(0);
            Py_DECREF(value);
        } else {
            arrays[i] = PySequence_Fast(value, names[i]);
            Py_DECREF(value);
        }
        if (arrays[i] == NULL) {
            return -1;
        }
        Py_ssize_t length = PySequence_Fast_GET_SIZE(arrays[i]);
        if (i == 0) {
            *count = length;
        } else if (length != *count) {
            PyErr_Format(PyExc_ValueError, "an order's %s hold %zd items, its skus %zd", names[i],
                         length, *count);
            return -1;
        }
    }
    return 0;
}

static int read_items(PyObject *arrays[ARRAY_COLUMNS], Py_ssize_t count, Item *items) {
    PyObject **skus = PySequence_Fast_ITEMS(arrays[0]);
    PyObject **quantities = PySequence_Fast_ITEMS(arrays[1]);
    PyObject **prices = PySequence_Fast_ITEMS(arrays[2]);
    for (Py_ssize_t n = 0; n < count; n++) {
        Item *item = &items[n];
        if (text_of(skus[n], "an item's sku", &item->sku) ||
            int_of(quantities[n], &item->quantity) ||
            int_of(prices[n], &item->unit_price_cents)) {
            return -1;
        }
        if (item->quantity < INT32_MIN || item->quantity > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "an item's quantity %lld is not an int32",
                         item->quantity);
            return -1;
        }
        item->size = text_field_size(item->sku) + int64_field_size(item->quantity) +
                     int64_field_size(item->unit_price_cents);
    }
    return 0;
}

/* Reads one row into `order` and its items; `keep` and `arrays` own the
 * objects the row's text lives in. */
static int read_order(PyObject *row, PyObject *statuses, Buffer *items, Order *order,
                      PyObject *keep[TEXT_COLUMNS], PyObject *arrays[ARRAY_COLUMNS]) {
    long long create_us, update_us;
    Text status;
    if (PySequence_Size(row) < ORDER_COLUMNS) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError,
                            "an order row starts with 11 columns: id, customer_id, currency, "
                            "status, total_cents, version, create_time, update_time, skus, "
                            "quantities, prices");
        }
        return -1;
    }
    if (read_int(row, 0, &order->id) ||
        read_text(row, 1, "an order's customer_id", &order->customer_id, &keep[0]) ||
        read_text(row, 2, "an order's currency", &order->currency, &keep[1]) ||
        read_text(row, 3, "an order's status", &status, &keep[2]) ||
        status_of(statuses, keep[2], &order->status) || read_int(row, 4, &order->total_cents) ||
        read_int(row, 5, &order->version) || read_int(row, 6, &create_us) ||
        read_int(row, 7, &update_us) || read_arrays(row, arrays, &order->item_count) ||
        reserve(items, (size_t)order->item_count * sizeof(Item)) ||
        read_items(arrays, order->item_count, (Item *)items->data)) {
        return -1;
    }
    order->create_time = stamp_of(create_us);
    order->update_time = stamp_of(update_us);
    order->size = int64_field_size(order->id) + text_field_size(order->customer_id) +
                  text_field_size(order->currency) + int64_field_size(order->status) +
                  int64_field_size(order->total_cents) + int64_field_size(order->version) +
                  len_field_size(stamp_size(order->create_time)) +
                  len_field_size(stamp_size(order->update_time));
    const Item *read = (const Item *)items->data;
    for (Py_ssize_t n = 0; n < order->item_count; n++) {
        order->size += len_field_size(read[n].size);
    }
    return 0;
}

/* Drops what read_order kept alive for the order's bytes. */
static void release_order(PyObject *keep[TEXT_COLUMNS], PyObject *arrays[ARRAY_COLUMNS]) {
    for (int i = 0; i < TEXT_COLUMNS; i++) {
        Py_XDECREF(keep[i]);
    }
    for (int i = 0; i < ARRAY_COLUMNS; i++) {
        Py_XDECREF(arrays[i]);
    }
}

/* The Order's body: what an `orders` entry holds, and GetOrder's response. */
static char *put_order_body(char *out, const Order *order, const Item *items) {
    out = put_int64_field(out, TAG(ORDER_ID, WIRE_VARINT), order->id);
    out = put_text_field(out, TAG(ORDER_CUSTOMER_ID, WIRE_LEN), order->customer_id);
    out = put_text_field(out, TAG(ORDER_CURRENCY, WIRE_LEN), order->currency);
    out = put_int64_field(out, TAG(ORDER_STATUS, WIRE_VARINT), order->status);
    for (Py_ssize_t n = 0; n < order->item_count; n++) {
        const Item *item = &items[n];
        out = put_len(out, TAG(ORDER_ITEMS, WIRE_LEN), item->size);
        out = put_text_field(out, TAG(ITEM_SKU, WIRE_LEN), item->sku);
        out = put_int64_field(out, TAG(ITEM_QUANTITY, WIRE_VARINT), item->quantity);
        out = put_int64_field(out, TAG(ITEM_UNIT_PRICE_CENTS, WIRE_VARINT), item->unit_price_cents);
    }
    out = put_int64_field(out, TAG(ORDER_TOTAL_CENTS, WIRE_VARINT), order->total_cents);
    out = put_int64_field(out, TAG(ORDER_VERSION, WIRE_VARINT), order->version);
    out = put_stamp_field(out, TAG(ORDER_CREATE_TIME, WIRE_LEN), order->create_time);
    return put_stamp_field(out, TAG(ORDER_UPDATE_TIME, WIRE_LEN), order->update_time);
}

static void put_order(Buffer *buffer, const Order *order, const Item *items) {
    char *out = buffer->data + buffer->size;
    out = put_len(out, TAG(RESPONSE_ORDERS, WIRE_LEN), order->size);
    out = put_order_body(out, order, items);
    buffer->size = (size_t)(out - buffer->data);
}

/* Row `index` of `rows` appended to `buffer` as one `orders` entry, if its
 * entry takes at most `room` bytes: 0 when appended, 1 when it did not fit
 * (nothing appended), -1 on error. */
static int encode_row(PyObject *rows, Py_ssize_t index, PyObject *statuses, Buffer *items,
                      Buffer *buffer, size_t room) {
    PyObject *row = PySequence_GetItem(rows, index);
    if (row == NULL) {
        return -1;
    }
    Order order;
    PyObject *keep[TEXT_COLUMNS] = {NULL, NULL, NULL};
    PyObject *arrays[ARRAY_COLUMNS] = {NULL, NULL, NULL};
    int outcome = read_order(row, statuses, items, &order, keep, arrays) ? -1 : 0;
    if (outcome == 0) {
        size_t entry = len_field_size(order.size);
        if (entry > room) {
            outcome = 1;
        } else if (reserve(buffer, entry)) {
            outcome = -1;
        } else {
            put_order(buffer, &order, (const Item *)items->data);
        }
    }
    release_order(keep, arrays);
    Py_DECREF(row);
    return outcome;
}

/* Rows from `start` (up to `end`) appended to `buffer` as `orders` entries
 * for as long as the message, `used` bytes before them, stays within
 * `budget`; the first entry of an empty message always goes in. Returns
 * the index of the first row left, or -1 on error. */
static Py_ssize_t put_rows(PyObject *rows, Py_ssize_t start, Py_ssize_t end, Py_ssize_t used,
                           Py_ssize_t budget, PyObject *statuses, Buffer *buffer) {
    Buffer items = {NULL, 0, 0}; /* one order's items at a time, read before written */
    Py_ssize_t index = start;
    for (; index < end; index++) {
        size_t filled = (size_t)used + buffer->size;
        size_t room = filled == 0                 ? SIZE_MAX
                      : filled >= (size_t)budget ? 0
                                                 : (size_t)budget - filled;
        int outcome = encode_row(rows, index, statuses, &items, buffer, room);
        if (outcome < 0) {
            index = -1;
            break;
        }
        if (outcome > 0) {
            break;
        }
    }
    PyMem_Free(items.data);
    return index;
}

static PyObject *encode_page(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *rows, *statuses, *token_object;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "OnO!U:encode_page", &rows, &count, &PyDict_Type, &statuses,
                          &token_object)) {
        return NULL;
    }
    Py_ssize_t available = PySequence_Size(rows);
    if (available < 0) {
        return NULL;
    }
    if (count < 0 || count > available) {
        PyErr_Format(PyExc_IndexError, "count %zd is outside 0..%zd", count, available);
        return NULL;
    }
    Text token;
    if (text_of(token_object, "next_page_token", &token)) {
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    PyObject *encoded = NULL;
    if (put_rows(rows, 0, count, 0, PY_SSIZE_T_MAX, statuses, &buffer) >= 0 &&
        !(token.size && reserve(&buffer, text_field_size(token)))) {
        if (token.size) {
            char *end = put_text(buffer.data + buffer.size,
                                 TAG(RESPONSE_NEXT_PAGE_TOKEN, WIRE_LEN), token);
            buffer.size = (size_t)(end - buffer.data);
        }
        encoded = PyBytes_FromStringAndSize(buffer.size ? buffer.data : "",
                                            (Py_ssize_t)buffer.size);
    }
    PyMem_Free(buffer.data);
    return encoded;
}

static PyObject *encode_orders(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *rows, *statuses;
    Py_ssize_t start, used, budget;
    if (!PyArg_ParseTuple(args, "OnnnO!:encode_orders", &rows, &start, &used, &budget,
                          &PyDict_Type, &statuses)) {
        return NULL;
    }
    Py_ssize_t count = rows_within_budget(rows, start, used, budget);
    if (count < 0) {
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    Py_ssize_t next = put_rows(rows, start, count, used, budget, statuses, &buffer);
    PyObject *result = next < 0 ? NULL
                                : Py_BuildValue("(y#n)", buffer.size ? buffer.data : "",
                                                (Py_ssize_t)buffer.size, next);
    PyMem_Free(buffer.data);
    return result;
}

static PyObject *encode_order(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *row, *statuses;
    if (!PyArg_ParseTuple(args, "OO!:encode_order", &row, &PyDict_Type, &statuses)) {
        return NULL;
    }
    Buffer items = {NULL, 0, 0};
    Order order;
    PyObject *keep[TEXT_COLUMNS] = {NULL, NULL, NULL};
    PyObject *arrays[ARRAY_COLUMNS] = {NULL, NULL, NULL};
    PyObject *encoded = NULL;
    if (!read_order(row, statuses, &items, &order, keep, arrays)) {
        encoded = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)order.size);
        if (encoded != NULL) {
            put_order_body(PyBytes_AS_STRING(encoded), &order, (const Item *)items.data);
        }
    }
    release_order(keep, arrays);
    PyMem_Free(items.data);
    return encoded;
}

static PyMethodDef methods[] = {
    {"encode_order", encode_order, METH_VARARGS,
     "encode_order(row, statuses) -> bytes\n\n"
     "One row as an Order message (GetOrder's response)."},
    {"encode_page", encode_page, METH_VARARGS,
     "encode_page(rows, count, statuses, next_page_token) -> bytes\n\n"
     "The ListOrdersResponse holding rows[:count] as its orders (each row's\n"
     "status name mapped through `statuses`) and `next_page_token`."},
    {"encode_orders", encode_orders, METH_VARARGS,
     "encode_orders(rows, start, used, budget, statuses) -> (bytes, next)\n\n"
     "Rows from `start` as `orders` entries while the message stays within\n"
     "`budget` bytes (`used` already in it); `next` is the first row left."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "service.orders.wire",
    .m_doc = "Order rows to ListOrders, ExportOrders and GetOrder wire bytes (see wire.c).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit_wire(void) { return PyModule_Create(&module); }
