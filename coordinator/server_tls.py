"""The coordinator's own TLS files, re-read when they change (server layer).

Certificates are renewed while the coordinator runs: cert-manager rewrites a Kubernetes Secret
(the kubelet swaps the mounted files at once), an operator copies new files and expects no
restart. :class:`ServerTls` holds the certificate, key and client CA the coordinator serves
with and notices a change by each file's identity (device, inode, size, modification time; a
Secret's mount swaps symlinks, so the target's identity changes):

* the gRPC port gets *dynamic* credentials: gRPC asks :meth:`ServerTls._fetch` at each new
  handshake, which hands it the new files once they changed (connections already open keep
  the certificate they were made with, as TLS does);
* the HTTPS listeners (``/metrics``, the web UI) register their ``ssl.SSLContext`` with
  :meth:`ServerTls.on_reload`, and the coordinator calls :meth:`ServerTls.check` every
  :data:`CHECK_INTERVAL` seconds, so they follow within that.

New files are used only once they load together (the key matches the certificate, the CA
parses): a rotation caught half-written keeps the old ones, with a warning, and is taken when
the files change again. The start-up files must load, or the coordinator refuses to start.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable

import grpc

from plait.errors import ConfigError

__all__ = ["CHECK_INTERVAL", "ServerTls"]

log = logging.getLogger(__name__)

CHECK_INTERVAL = 30.0  # seconds between checks for the HTTPS listeners

_Identity = tuple[tuple[int, int, int, int] | None, ...]


def _identity(paths: tuple[str, ...]) -> _Identity:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows a Secret mount's symlinks to the file itself
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Loads a certificate chain and its key, given as bytes, into ``ctx`` (which checks that
    they match). ``load_cert_chain`` takes only paths: a private temporary file (mode 0600),
    removed at once."""
    with tempfile.NamedTemporaryFile(prefix="plait-tls-", suffix=".pem") as f:
        f.write(cert + b"\n" + key)
        f.flush()
        ctx.load_cert_chain(f.name)


class ServerTls:
    """The certificate (chain), key and optional client CA at ``cert``, ``key``, ``client_ca``.

    Raises:
        ConfigError: at construction, naming the file, when the files cannot be read or do not
            load together.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self._lock = threading.Lock()  # gRPC's handshakes call _fetch from its own threads
        self._listeners: list[Callable[[], None]] = []
        self._seen = _identity(self._paths)
        self.pem = self._load()  # (key, cert, ca); raises ConfigError
        self.generation = 0  # one more for each change taken
        self._served = 0  # the generation gRPC has

    def _load(self) -> tuple[bytes, bytes, bytes | None]:
        """The three files' bytes, once they are known to load together."""
        files: dict[str, bytes] = {}
        for name, path in (("tls_cert", self.cert), ("tls_key", self.key)) + (
            (("tls_client_ca", self.client_ca),) if self.client_ca is not None else ()
        ):
            try:
                with open(path, "rb") as f:
                    files[name] = f.read()
            except OSError as e:
                raise ConfigError(f"{name} {path}: {e.strerror or e}") from e
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # the bytes just read, not the paths again: the files may change meanwhile
            _load_pair(ctx, files["tls_cert"], files["tls_key"])
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls_cert {self.cert} with tls_key {self.key}: {e}") from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cadata=files["tls_client_ca"].decode("ascii"))
            except (ValueError, ssl.SSLError) as e:
                raise ConfigError(f"tls_client_ca {self.client_ca}: {e}") from None
        return files["tls_key"], files["tls_cert"], files.get("tls_client_ca")

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Calls ``listener`` after each change taken (an HTTPS listener reloads its context)."""
        self._listeners.append(listener)

    def check(self) -> bool:
        """Takes the files if they changed since last seen and load together; says whether
        it took new ones."""
        now = _identity(self._paths)
        with self._lock:
            if now == self._seen:
                return False
            self._seen = now
            try:
                pem = self._load()
            except ConfigError as e:
                log.warning("TLS files changed but cannot be used yet; keeping the old ones: %s", e)
                return False
            if pem == self.pem:
                return False  # touched, not changed
            self.pem = pem
            self.generation += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        for listener in self._listeners:
            try:
                listener()
            except Exception as e:  # one listener's failure must not stop the others
                log.warning("reloading TLS for a listener failed: %s", e)
        return True

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, cert, ca = self.pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: new files to use from now on, or None."""
        try:
            self.check()
            with self._lock:
                if self._served == self.generation:
                    return None
                self._served = self.generation
                return self._configuration()
        except Exception as e:  # raising into gRPC's handshake would fail it
            log.warning("checking the TLS files failed: %s", e)
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the gRPC port that follow the files; with a client CA every peer
        must present a certificate it signed (gRPC Python cannot ask only some)."""
        with self._lock:
            self._served = self.generation
            initial = self._configuration()
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self._fetch,  # type: ignore[arg-type]  # None means "no change" (gRPC's docs)
            require_client_authentication=self.client_ca is not None,
        )

    def reload_context(self, ctx: ssl.SSLContext) -> Callable[[], None]:
        """A listener that loads the current certificate and key into ``ctx`` (new
        connections get them; OpenSSL keeps the old ones for those already open)."""

        def reload() -> None:
            key, cert, ca = self.pem  # the bytes check() verified, not the files again
            _load_pair(ctx, cert, key)
            if ca is not None:  # added: a CA trusted before stays trusted until a restart
                ctx.load_verify_locations(cadata=ca.decode("ascii"))

        return reload
