"""The one thing pyproject.toml cannot declare stably: the C extensions.

StreamEvents and ListOrders encode their rows in C (service/events/wire.c,
service/orders/wire.c, sharing service/rpc/protobuf_wire.h); building messages
through the protobuf Python API was most of a stream's cost per row and a
fifth of a ListOrders call's.
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
SHARED_HEADERS = ["service/rpc/protobuf_wire.h"]

setup(
    ext_modules=[
        Extension(
            f"service.{package}.wire",
            sources=[f"service/{package}/wire.c"],
            depends=SHARED_HEADERS,
            extra_compile_args=COMPILE_ARGS,
        )
        for package in ("events", "orders")
    ]
)
