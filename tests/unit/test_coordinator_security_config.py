"""Secure by default: the coordinator's start-up rules for TLS, authentication and exposure."""

from __future__ import annotations

from pathlib import Path

import pytest

from plait.coordinator.config import load_config, parse_args
from plait.errors import ConfigError
from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from tests.tlsfixtures import Pki, pki  # noqa: F401


def config(*argv: str) -> object:
    return load_config(parse_args(list(argv)), environ={})


def tls_args(p: Pki, *, client_ca: bool = True) -> list[str]:
    args = ["--tls-cert", str(p.coordinator.cert), "--tls-key", str(p.coordinator.key)]
    return [*args, "--tls-client-ca", str(p.ca)] if client_ca else args


def test_loopback_without_tls_or_auth_is_the_development_default() -> None:
    cfg = config("--listen", "127.0.0.1:7450")
    assert not cfg.tls and not cfg.auth_enabled  # type: ignore[attr-defined]
    assert not cfg.reflection  # type: ignore[attr-defined]


@pytest.mark.parametrize("listen", ["0.0.0.0:7450", "10.1.2.3:7450", "[::]:7450", "coord:7450"])
def test_non_loopback_listen_without_tls_and_auth_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as e:
        config("--listen", listen)
    msg = e.value.message
    assert listen in msg and "TLS (--tls-cert and --tls-key)" in msg
    assert "authentication (--tls-client-ca and/or --auth-tokens)" in msg


def test_tls_without_authentication_is_refused_beyond_loopback(pki: Pki) -> None:  # noqa: F811
    with pytest.raises(ConfigError) as e:
        config("--listen", "0.0.0.0:7450", *tls_args(pki, client_ca=False))
    assert "authentication" in e.value.message and "TLS (" not in e.value.message


def test_tokens_without_tls_are_refused_beyond_loopback(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        token_file_text([TokenEntry("a", frozenset({Role.READ}), hash_token(new_token()))])
    )
    with pytest.raises(ConfigError) as e:
        config("--listen", "0.0.0.0:7450", "--auth-tokens", str(tokens))
    assert "TLS (--tls-cert and --tls-key)" in e.value.message


def test_mtls_beyond_loopback_is_accepted(pki: Pki) -> None:  # noqa: F811
    cfg = config("--listen", "0.0.0.0:7450", *tls_args(pki))
    assert cfg.tls and cfg.auth_enabled  # type: ignore[attr-defined]


def test_cert_without_key_and_client_ca_without_cert_are_refused(pki: Pki) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be given together"):
        config("--tls-cert", str(pki.coordinator.cert))
    with pytest.raises(ConfigError, match="tls_client_ca needs tls_cert"):
        config("--tls-client-ca", str(pki.ca))


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config("--auth-tokens", str(tmp_path / "nope.toml"))
    assert "auth_tokens" in e.value.message and "nope.toml" in e.value.message


def test_public_metrics_need_an_explicit_flag(pki: Pki) -> None:  # noqa: F811
    base = ["--listen", "0.0.0.0:7450", *tls_args(pki)]
    with pytest.raises(ConfigError) as e:
        config(*base, "--metrics-listen", "0.0.0.0:9450")
    assert "--metrics-public" in e.value.message
    cfg = config(*base, "--metrics-listen", "0.0.0.0:9450", "--metrics-public")
    assert cfg.metrics_public  # type: ignore[attr-defined]


def test_reflection_and_booleans_from_environment_and_toml(tmp_path: Path) -> None:
    assert config("--reflection").reflection  # type: ignore[attr-defined]
    env_cfg = load_config(parse_args([]), environ={"PLAIT_REFLECTION": "true"})
    assert env_cfg.reflection
    toml = tmp_path / "c.toml"
    toml.write_text("[coordinator]\nreflection = true\n")
    assert config("--config", str(toml)).reflection  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(parse_args([]), environ={"PLAIT_REFLECTION": "maybe"})


def test_a_malformed_token_file_refuses_to_start(tmp_path: Path) -> None:
    from plait.coordinator.main import main

    bad = tmp_path / "tokens.toml"
    bad.write_text('[[tokens]]\nname = "x"\nroles = ["root"]\nsha256 = "' + "0" * 64 + '"\n')
    code = main(["--auth-tokens", str(bad), "--store", f"sqlite:///{tmp_path}/j.db"])
    assert code == 2


def test_server_tls_files_come_from_their_own_variables(pki: Pki) -> None:  # noqa: F811
    # PLAIT_TLS_CERT/KEY are a client's own certificate; the coordinator ignores them.
    client_env = {"PLAIT_TLS_CERT": str(pki.user("operator").cert)}
    assert load_config(parse_args([]), environ=client_env).tls_cert is None
    server_env = {
        "PLAIT_SERVER_TLS_CERT": str(pki.coordinator.cert),
        "PLAIT_SERVER_TLS_KEY": str(pki.coordinator.key),
        "PLAIT_SERVER_TLS_CLIENT_CA": str(pki.ca),
    }
    cfg = load_config(parse_args(["--listen", "0.0.0.0:7450"]), environ=server_env)
    assert cfg.tls_cert == str(pki.coordinator.cert) and cfg.tls_client_ca == str(pki.ca)
