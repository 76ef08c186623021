"""The one thing pyproject.toml cannot declare stably: the C extension.

StreamEvents encodes its rows in C (service/events/wire.c); building messages
through the protobuf Python API was most of a stream's cost per row.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service.events.wire",
            sources=["service/events/wire.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)
