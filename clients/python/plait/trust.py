"""Is this address a coordinator? A TLS check for leader hints (foundation layer).

A standby's ``NOT_LEADER`` refusal names the leader's address. A client or worker follows such a
hint only to an address it was given (``--coordinator``), or, with TLS configured, to an address
whose certificate proves it is a coordinator: it chains to the configured CA, matches the
address's host (or ``--tls-server-name``) and carries the coordinator identity of
:mod:`plait.security` (URI SAN ``plait://coordinator/<name>`` and ``OU=coordinator``). Otherwise
a compromised or misconfigured standby could steer every client -- and its bearer token -- to any
host the same CA ever signed a certificate for.

The check is one blocking TLS handshake with Python's :mod:`ssl`, bounded by a timeout; callers
on an event loop run it in a thread.
"""

from __future__ import annotations

import socket
import ssl

from plait.clock import Clock, SystemClock
from plait.security import TlsFiles, host_of, identity_from_pem

__all__ = ["VERIFY_TIMEOUT", "verify_coordinator"]

VERIFY_TIMEOUT = 2.0
"""Seconds one check may take, connect and handshake together."""


def verify_coordinator(
    address: str,
    tls: TlsFiles,
    timeout: float = VERIFY_TIMEOUT,
    clock: Clock | None = None,
) -> str | None:
    """Shakes hands with ``address`` and checks that its certificate is a coordinator's.

    Returns None when it is, else why not (a phrase for a log line: "its certificate did not
    verify: ..."). Never raises for a failed check; blocks for at most ``timeout`` seconds.
    """
    clock = clock or SystemClock()
    deadline = clock.monotonic() + timeout
    host = host_of(address)
    port = int(address.rpartition(":")[2])
    try:
        ctx = _context(tls)
        with socket.create_connection((host, port), timeout=timeout) as raw:
            # The connect used part of the budget; the handshake gets what is left.
            raw.settimeout(max(0.05, deadline - clock.monotonic()))
            with ctx.wrap_socket(raw, server_hostname=tls.server_name or host) as conn:
                der = conn.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        return f"its certificate did not verify: {err.verify_message or err}"
    except TimeoutError:
        return f"the TLS handshake did not finish within {timeout:g}s"
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        return f"the TLS handshake failed: {err}"
    if not der:
        return "it presented no certificate"
    try:
        identity = identity_from_pem(ssl.DER_cert_to_PEM_cert(der).encode())
    except ValueError as err:
        return f"its certificate could not be read: {err}"
    if not identity.coordinator:
        return (
            f"its certificate ({identity.subject}) is not a coordinator's (no URI"
            " plait://coordinator/NAME with OU=coordinator)"
        )
    return None


def _context(tls: TlsFiles) -> ssl.SSLContext:
    """A client context trusting only the configured CA, presenting our certificate if any."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=tls.read("ca").decode("ascii", errors="replace"))
    if tls.cert is not None and tls.key is not None:
        # A coordinator that requires client certificates would refuse the handshake otherwise.
        ctx.load_cert_chain(tls.cert, tls.key)
    # gRPC servers negotiate HTTP/2 by ALPN; offering it makes the handshake look like gRPC's.
    ctx.set_alpn_protocols(["h2"])
    return ctx
