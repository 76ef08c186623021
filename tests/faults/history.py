"""The rows the fault suite writes before any fault (the `history`
fixture), which a stream that ends OK must deliver in full: their sizes and
the subject and customer the scenarios read them by."""

HISTORY_EVENTS = 20_000
HISTORY_ORDERS = 5_000
EVENTS_SUBJECT = "history/events"
# A short history, for the scenarios that start streams by the thousand.
SHORT_EVENTS = 1_000
SHORT_SUBJECT = "history/short"
ORDERS_CUSTOMER = "history/orders"
