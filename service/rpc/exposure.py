"""Closed by default: the service refuses to serve callers it cannot
authenticate unless the development switch (ORDERSTREAM_INSECURE_DEV) says
so, and then says loudly, at every start, what it leaves open.

Caller authentication is bearer tokens (ORDERSTREAM_AUTH_TOKENS_FILE) or
client certificates whose identities map to scopes
(ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE, over mTLS). mTLS alone
authenticates no one in particular: every certificate its CA signed could
call every method, so it does not count.
"""

from __future__ import annotations

import logging

from service.errors import StartupError
from service.settings import Settings

log = logging.getLogger(__name__)

SWITCH = "ORDERSTREAM_INSECURE_DEV"


def authenticates_callers(settings: Settings) -> bool:
    return settings.auth_tokens_file is not None or settings.auth_cert_identities_file is not None


def what_is_open(settings: Settings) -> list[str]:
    """What anyone who reaches the port gets, each named with its setting."""
    exposed = []
    if settings.tls is None:
        exposed.append("plain text (ORDERSTREAM_TLS_CERT unset)")
    if not authenticates_callers(settings):
        exposed.append(
            "no caller authentication (ORDERSTREAM_AUTH_TOKENS_FILE and "
            "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE unset): every method to every caller"
        )
        if settings.reflection:
            exposed.append("reflection (ORDERSTREAM_REFLECTION on): the whole contract")
    return exposed


def check_exposure(settings: Settings) -> None:
    """Raises StartupError when callers would go unauthenticated without
    the switch; with it, logs a WARNING naming what is open."""
    if settings.insecure_dev:
        log.warning(
            "INSECURE DEVELOPMENT MODE (%s=1), never use it outside local development; "
            "open to anyone who reaches the port: %s",
            SWITCH,
            "; ".join(what_is_open(settings)) or "nothing (the switch is set but unused)",
        )
        return
    refuse_unauthenticated(settings)
    if settings.tls is None:
        log.warning(
            "the listener is plain text (ORDERSTREAM_TLS_CERT unset): bearer tokens "
            "travel unencrypted unless something in front of the service adds TLS"
        )


def refuse_unauthenticated(settings: Settings) -> None:
    """StartupError unless callers are authenticated or the switch is set."""
    if not settings.insecure_dev and not authenticates_callers(settings):
        mtls_alone = settings.tls is not None and settings.tls.client_ca is not None
        raise StartupError(
            "refusing to serve without caller authentication: set "
            "ORDERSTREAM_AUTH_TOKENS_FILE (bearer tokens with scopes) or "
            "ORDERSTREAM_AUTH_CERT_IDENTITIES_FILE (client certificates mapped to scopes, "
            "with ORDERSTREAM_TLS_CLIENT_CA)"
            + (
                "; ORDERSTREAM_TLS_CLIENT_CA alone would let every certificate its CA "
                "signed call every method"
                if mtls_alone
                else ""
            )
            + f"; for local development only, {SWITCH}=1 serves anyone"
        )
