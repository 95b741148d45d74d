"""``plait certs`` and ``plait tokens``: TLS material and bearer tokens (CLI layer).

Securing a cluster takes three commands::

    plait certs init --dir pki --coordinator-host coord.example.com
    plait certs worker w1 w2 w3 --dir pki
    plait tokens create --file tokens.toml --name alice --role submit

The certificates follow :mod:`plait.security`'s convention (made by :mod:`plait.certs`); the
token file keeps SHA-256 digests only, so a token is shown once, when it is created.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.security import TokenEntry

    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parsers"]

EXIT_OK = 0
# Roles a person or program may hold; `worker` comes with a worker certificate instead.
CLIENT_ROLES = ("read", "submit", "operate")
DEFAULT_COORDINATOR_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_COORDINATOR_NAME = "coordinator"
ADMIN_NAME = "admin"
_HASH_SHOWN = 8  # hex digits of a digest `tokens list` shows: enough to tell entries apart


def _dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        required=True,
        metavar="DIR",
        help="directory holding ca.crt and ca.key; new files are written here",
    )


def _issue_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--days",
        type=int,
        default=None,
        metavar="N",
        help="validity of the new certificate(s) in days (default: 365)",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite existing files (default: refuse)"
    )


def _file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--file",
        required=True,
        metavar="FILE",
        help="the coordinator's token file (TOML, SHA-256 digests only)",
    )


def add_parsers(sub: _SubParsers) -> None:
    """Registers ``plait certs ...`` and ``plait tokens ...``."""
    certs = sub.add_parser(
        "certs",
        help="make a development CA and certificates for coordinators, workers and clients",
        description="Certificates follow Plait's identity convention: URI SAN "
        "plait://<kind>/<name>, one subject OU per role. Keys are ECDSA P-256, written 0600.",
    )
    csub = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)

    p = csub.add_parser(
        "init",
        help="create a CA, a coordinator certificate and an admin client certificate",
        description="Writes DIR/ca.{crt,key}, DIR/coordinator.{crt,key} and DIR/admin.{crt,key}"
        " (user 'admin', role operate). Keep ca.key off the cluster's hosts.",
    )
    _dir_flag(p)
    p.add_argument(
        "--coordinator-host",
        action="append",
        metavar="HOST",
        help="DNS name or IP clients dial the coordinator by; repeat for several "
        f"(default: {', '.join(DEFAULT_COORDINATOR_HOSTS)})",
    )
    p.add_argument(
        "--coordinator-name",
        default=DEFAULT_COORDINATOR_NAME,
        metavar="NAME",
        help=f"the coordinator's identity name (default: {DEFAULT_COORDINATOR_NAME})",
    )
    p.add_argument(
        "--ca-days",
        type=int,
        default=None,
        metavar="N",
        help="validity of the CA in days (default: 3650)",
    )
    _issue_flags(p)
    p.set_defaults(func=cmd_certs_init)

    p = csub.add_parser(
        "worker",
        help="issue worker certificates (DIR/worker-<id>.crt and .key)",
        description="One certificate per worker id: plait://worker/<id>, OU=worker. It lets "
        "only that worker id connect.",
    )
    p.add_argument("worker_ids", nargs="+", metavar="WORKER_ID", help="worker id(s)")
    _dir_flag(p)
    _issue_flags(p)
    p.set_defaults(func=cmd_certs_worker)

    p = csub.add_parser(
        "client",
        help="issue a client certificate (DIR/client-<name>.crt and .key)",
        description="A user certificate plait://user/<name> granting the given roles.",
    )
    p.add_argument("name", metavar="NAME", help="the user's name")
    p.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help=f"role to grant: {', '.join(CLIENT_ROLES)}; repeat for several "
        "(operate implies submit, submit implies read)",
    )
    _dir_flag(p)
    _issue_flags(p)
    p.set_defaults(func=cmd_certs_client)

    p = csub.add_parser(
        "coordinator",
        help="issue another coordinator certificate (DIR/coordinator-<name>.crt and .key)",
        description="For HA groups: one certificate per coordinator, naming the hosts clients "
        "and standbys dial it by.",
    )
    p.add_argument("name", metavar="NAME", help="the coordinator's identity name")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="HOST",
        help="DNS name or IP this coordinator is dialled by; repeat for several",
    )
    _dir_flag(p)
    _issue_flags(p)
    p.set_defaults(func=cmd_certs_coordinator)

    p = csub.add_parser("show", help="print the identity a certificate carries")
    p.add_argument("files", nargs="+", metavar="FILE", help="PEM certificate file(s)")
    p.set_defaults(func=cmd_certs_show)

    tokens = sub.add_parser(
        "tokens",
        help="manage the coordinator's bearer-token file",
        description="The file keeps a name, roles and the token's SHA-256 per entry; the "
        "coordinator reloads it on SIGHUP.",
    )
    tsub = tokens.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND", required=True)

    p = tsub.add_parser(
        "create",
        help="add a token and print it once",
        description="Prints only the new token on stdout; the file keeps its hash.",
    )
    _file_flag(p)
    p.add_argument(
        "--name",
        required=True,
        metavar="NAME",
        help="who holds the token (for a worker token: the worker id it may use)",
    )
    p.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="role to grant: read, submit, operate or worker; repeat for several",
    )
    p.set_defaults(func=cmd_tokens_create)

    p = tsub.add_parser("list", help="list token names, roles and creation times")
    _file_flag(p)
    p.set_defaults(func=cmd_tokens_list)

    p = tsub.add_parser("revoke", help="remove every token of a name")
    _file_flag(p)
    p.add_argument("name", metavar="NAME", help="the name whose tokens to remove")
    p.add_argument(
        "--hash",
        metavar="PREFIX",
        help="remove only the entry whose SHA-256 starts with PREFIX (as `tokens list` shows)",
    )
    p.set_defaults(func=cmd_tokens_revoke)


# -- certs ----------------------------------------------------------------------------------


def _days(value: int | None, flag: str, default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise ConfigError(f"{flag} {value}: must be at least 1")
    return value


def _client_roles(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        role = v.strip().lower()
        if role not in CLIENT_ROLES:
            hint = " (worker certificates: plait certs worker)" if role == "worker" else ""
            raise ConfigError(f"--role {v!r}: expected one of {', '.join(CLIENT_ROLES)}{hint}")
        if role not in out:
            out.append(role)
    return out


def _say(paths: list[str]) -> None:
    for path in paths:
        print(f"wrote {path}")


def cmd_certs_init(args: argparse.Namespace) -> int:
    """``plait certs init``: CA, coordinator and admin certificates in one directory."""
    from plait import certs
    from plait.security import check_name

    check_name(args.coordinator_name, "--coordinator-name")
    hosts = args.coordinator_host or list(DEFAULT_COORDINATOR_HOSTS)
    days = _days(args.days, "--days", certs.DEFAULT_LEAF_DAYS)
    ca_days = _days(args.ca_days, "--ca-days", certs.DEFAULT_CA_DAYS)
    stems = (certs.CA_STEM, "coordinator", ADMIN_NAME)
    # Refuse before writing anything: a half-written directory is worse than none.
    certs.check_absent(
        [os.path.join(args.dir, f"{s}.{ext}") for s in stems for ext in ("crt", "key")],
        args.force,
    )
    ca = certs.make_ca(days=ca_days)
    coord = ca.issue("coordinator", args.coordinator_name, hosts=hosts, days=days)
    admin = ca.issue("user", ADMIN_NAME, roles=["operate"], days=days)
    written: list[str] = []
    written += certs.write_ca(ca, args.dir, args.force)
    written += certs.write_pair(args.dir, "coordinator", *coord, force=args.force)
    written += certs.write_pair(args.dir, ADMIN_NAME, *admin, force=args.force)
    _say(written)
    d = args.dir
    print(
        f"\ncoordinator: --tls-ca {d}/ca.crt --tls-cert {d}/coordinator.crt"
        f" --tls-key {d}/coordinator.key\n"
        f"admin:       --tls-ca {d}/ca.crt --tls-cert {d}/admin.crt --tls-key {d}/admin.key\n"
        f"workers:     plait certs worker ID... --dir {d}\n"
        f"keep {d}/ca.key private: whoever holds it can mint any identity"
    )
    return EXIT_OK


def _issue_many(
    args: argparse.Namespace, kind: str, items: list[tuple[str, str, list[str], list[str]]]
) -> int:
    """Issues ``(stem, name, roles, hosts)`` certificates with the CA in ``args.dir``."""
    from plait import certs

    days = _days(args.days, "--days", certs.DEFAULT_LEAF_DAYS)
    ca = certs.load_ca(args.dir)
    certs.check_absent(
        [os.path.join(args.dir, f"{stem}.{ext}") for stem, *_ in items for ext in ("crt", "key")],
        args.force,
    )
    written: list[str] = []
    for stem, name, roles, hosts in items:
        cert, key = ca.issue(kind, name, roles=roles, hosts=hosts, days=days)
        written += certs.write_pair(args.dir, stem, cert, key, force=args.force)
    _say(written)
    return EXIT_OK


def cmd_certs_worker(args: argparse.Namespace) -> int:
    """``plait certs worker ID...``: one certificate per worker id."""
    from plait.security import check_name

    ids = list(dict.fromkeys(args.worker_ids))  # a repeated id is one certificate
    for wid in ids:
        check_name(wid, "WORKER_ID")
    return _issue_many(args, "worker", [(f"worker-{w}", w, [], []) for w in ids])


def cmd_certs_client(args: argparse.Namespace) -> int:
    """``plait certs client NAME --role ROLE``: a user certificate."""
    from plait.security import check_name

    check_name(args.name, "NAME")
    roles = _client_roles(args.role)
    return _issue_many(args, "user", [(f"client-{args.name}", args.name, roles, [])])


def cmd_certs_coordinator(args: argparse.Namespace) -> int:
    """``plait certs coordinator NAME --host H``: one more coordinator's certificate."""
    from plait.security import check_name

    check_name(args.name, "NAME")
    return _issue_many(
        args, "coordinator", [(f"coordinator-{args.name}", args.name, [], args.host)]
    )


def describe_certificate(pem: bytes, where: str) -> list[str]:
    """The lines ``plait certs show`` prints for one PEM certificate.

    Raises:
        ConfigError: ``pem`` is not a certificate.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from plait.clock import SystemClock, wall_datetime
    from plait.security import identity_from_pem

    try:
        cert = x509.load_pem_x509_certificate(pem)
        ident = identity_from_pem(pem)
    except ValueError as e:
        raise ConfigError(f"{where}: not a PEM certificate ({e})") from None
    sans: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [f"URI:{u}" for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        sans += [f"DNS:{d}" for d in san.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{i}" for i in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}
        names[ExtendedKeyUsageOID.CLIENT_AUTH] = "clientAuth"
        usage = ", ".join(names.get(o, o.dotted_string) for o in eku)
    except x509.ExtensionNotFound:
        usage = "any"
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    now = wall_datetime(SystemClock())
    state = "EXPIRED" if now > end else "NOT YET VALID" if now < start else "valid"
    roles = ", ".join(sorted(r.value for r in ident.roles)) or "(none)"
    return [
        f"file:        {where}",
        f"principal:   {ident.principal}" + (" (CA)" if is_ca else ""),
        f"roles:       {roles}",
        f"coordinator: {'yes' if ident.coordinator else 'no'}",
        f"subject:     {ident.subject}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
        f"SANs:        {', '.join(sans) or '(none)'}",
        f"usage:       {usage}",
        f"valid:       {start:%Y-%m-%dT%H:%M:%SZ} to {end:%Y-%m-%dT%H:%M:%SZ} ({state})",
    ]


def cmd_certs_show(args: argparse.Namespace) -> int:
    """``plait certs show FILE...``: what identity each certificate names."""
    from plait.cli.render import clean

    blocks: list[str] = []
    for path in args.files:
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(f"FILE {path}: {e.strerror or e}") from e
        # A certificate's names are whatever its issuer wrote: escaped for the terminal.
        blocks.append("\n".join(clean(line) for line in describe_certificate(pem, path)))
    print("\n\n".join(blocks))
    return EXIT_OK


# -- tokens ---------------------------------------------------------------------------------


def _load_tokens(path: str, missing_ok: bool) -> list[TokenEntry]:
    from plait.security import load_token_file

    if missing_ok and not os.path.exists(path):
        return []
    return list(load_token_file(path).values())


def _save_tokens(path: str, entries: list[TokenEntry]) -> None:
    from plait.certs import KEY_MODE, write_file
    from plait.security import token_file_text

    # Replaced atomically, mode 0600: the coordinator may reload it at any moment, and the
    # digests, while not secrets, say who holds which roles.
    write_file(path, token_file_text(entries).encode(), KEY_MODE, force=True)


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """``plait tokens create``: appends an entry and prints the token once."""
    from plait.clock import SystemClock, wall_datetime
    from plait.security import TokenEntry, check_name, hash_token, new_token, parse_roles

    name = check_name(args.name, "--name")
    roles = parse_roles(args.role, "--role")
    entries = _load_tokens(args.file, missing_ok=True)
    token = new_token()
    created = wall_datetime(SystemClock()).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries.append(TokenEntry(name, roles, hash_token(token), created))
    _save_tokens(args.file, entries)
    print(token)
    print(
        f"store it now; only its hash is kept in {args.file}; "
        "the coordinator reloads the file on SIGHUP",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """``plait tokens list``: names, roles, creation times and short digests."""
    from plait.cli.render import clean

    entries = _load_tokens(args.file, missing_ok=False)
    if not entries:
        print(f"no tokens in {args.file}", file=sys.stderr)
        return EXIT_OK
    rows = [("NAME", "ROLES", "CREATED", "SHA256")]
    for e in entries:
        roles = ",".join(sorted(r.value for r in e.roles))
        rows.append((clean(e.name), roles, clean(e.created) or "-", e.sha256[:_HASH_SHOWN]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """``plait tokens revoke NAME``: removes that name's entries (exit 2 if it has none)."""
    entries = _load_tokens(args.file, missing_ok=False)
    prefix = (args.hash or "").lower()
    if args.hash is not None and len(prefix) < 4:
        raise ConfigError(f"--hash {args.hash!r}: give at least 4 hex digits")

    def doomed(e: TokenEntry) -> bool:
        return e.name == args.name and e.sha256.startswith(prefix)

    gone = [e for e in entries if doomed(e)]
    if not gone:
        which = f" with hash {prefix}..." if prefix else ""
        raise ConfigError(f"NAME {args.name!r}: no token{which} in {args.file}")
    if prefix and len(gone) > 1:
        raise ConfigError(f"--hash {prefix}: matches {len(gone)} tokens; give more digits")
    _save_tokens(args.file, [e for e in entries if not doomed(e)])
    print(
        f"revoked {len(gone)} token(s) of {args.name}; "
        "send the coordinator SIGHUP to reload the file",
        file=sys.stderr,
    )
    return EXIT_OK
