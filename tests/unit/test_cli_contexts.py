"""The client config file and its contexts (plait.cli.contexts) and ``plait config ...``.

Precedence, for each setting: the command's flag, then the ``PLAIT_*`` variable, then the
context in use (``--context``, else ``$PLAIT_CONTEXT``, else the file's ``current-context``),
then the default. A token may sit only in a file nobody else can read.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from plait.cli.commands import client_for
from plait.cli.contexts import connection, load_config
from plait.cli.main import build_parser, main
from plait.errors import ConfigError

CONFIG = """\
# my clusters
current-context = "dev"

[contexts.dev]
coordinator = "127.0.0.1:7001"

[contexts.prod]
coordinator = "10.0.0.1:7450, 10.0.0.2:7450"
tls-ca = "pki/ca.crt"
tls-cert = "pki/me.crt"
tls-key = "pki/me.key"
token-file = "prod.token"
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config dir with CONFIG, its TLS files and a 0600 token file; a clean environment."""
    for var in list(os.environ):
        if var.startswith("PLAIT_"):
            monkeypatch.delenv(var)
    (tmp_path / "pki").mkdir()
    for name in ("ca.crt", "me.crt", "me.key", "other-ca.crt"):
        (tmp_path / "pki" / name).write_text("pem")
    token = tmp_path / "prod.token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    monkeypatch.setenv("PLAIT_CLIENT_CONFIG", str(config))
    return tmp_path


def args(*argv: str) -> argparse.Namespace:
    """What main() hands a command: the global flags folded in."""
    ns = build_parser().parse_args([*argv, "status", "wf-1"])
    for name in ("coordinator", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "context"):
        if getattr(ns, name, None) is None:
            setattr(ns, name, getattr(ns, "global_" + name))
    return ns


def test_the_current_context_is_used(home: Path) -> None:
    conn = connection(args())
    assert (conn.target, conn.tls, conn.token, conn.context) == ("127.0.0.1:7001", False, "", "dev")
    with client_for(args()) as client:  # what every client command dials
        assert client.targets == ("127.0.0.1:7001",)


def test_context_flag_then_env_then_current(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_CONTEXT", "prod")
    conn = connection(args())
    assert conn.context == "prod"
    assert conn.target == "10.0.0.1:7450,10.0.0.2:7450"
    assert conn.tls is not False
    assert conn.tls.ca == str(home / "pki/ca.crt")  # relative to the file
    assert (conn.tls.cert, conn.tls.key) == (str(home / "pki/me.crt"), str(home / "pki/me.key"))
    assert conn.token == "s3cret"
    assert connection(args("--context", "dev")).context == "dev"  # the flag wins over the env


def test_flags_then_env_win_over_the_context(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_CONTEXT", "prod")
    monkeypatch.setenv("PLAIT_COORDINATOR", "10.9.9.9:1")
    monkeypatch.setenv("PLAIT_TOKEN", "from-env")
    monkeypatch.setenv("PLAIT_TLS_CA", str(home / "pki/other-ca.crt"))
    conn = connection(args())
    assert conn.target is None  # the client reads $PLAIT_COORDINATOR itself
    assert conn.token == "from-env"
    assert conn.tls is not False and conn.tls.ca == str(home / "pki/other-ca.crt")
    assert conn.tls.cert == str(home / "pki/me.crt")  # not given elsewhere: the context's
    conn = connection(args("--coordinator", "10.8.8.8:2", "--tls-ca", str(home / "pki/ca.crt")))
    assert conn.target == "10.8.8.8:2"
    assert conn.tls is not False and conn.tls.ca == str(home / "pki/ca.crt")


def test_without_a_file_the_defaults_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("PLAIT_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    conn = connection(args())
    assert (conn.target, conn.tls, conn.token, conn.context) == (None, False, "", None)
    with pytest.raises(ConfigError, match="--context: context 'x', but there is no"):
        connection(args("--context", "x"))


def test_an_unknown_context_names_the_known_ones(home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        connection(args("--context", "staging"))
    assert str(err.value) == (
        f"--context: no context 'staging' in {home / 'config.toml'} (its contexts: dev, prod)"
    )


def test_a_token_in_a_file_others_can_read_is_refused(home: Path) -> None:
    config = home / "config.toml"
    config.write_text(CONFIG.replace('token-file = "prod.token"', 'token = "inline"'))
    config.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert str(err.value) == (
        f"{config}: this config file holds a token but is readable by others (mode 0644);"
        f" run `chmod 600 {config}`"
    )
    config.chmod(0o600)
    loaded = load_config()
    assert loaded is not None and loaded.contexts["prod"].read_token() == "inline"
    (home / "prod.token").chmod(0o640)
    config.write_text(CONFIG)
    with pytest.raises(ConfigError, match="this token file is readable by others"):
        connection(args("--context", "prod"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[contexts.a]\nserver = 'x:1'\n", "contexts.a: unknown key 'server'; allowed:"),
        ("[contexts.a]\ncoordinator = 'nohost'\n", "contexts.a.coordinator: 'nohost'"),
        ("colour = 1\n", "unknown key 'colour'; allowed: current-context, [contexts.NAME]"),
        ("[contexts.a]\ntoken = 't'\ntoken-file = 'f'\n", "give token or token-file, not both"),
        ("this is = not toml =\n", ""),
    ],
)
def test_bad_files_are_refused_naming_the_file(home: Path, text: str, message: str) -> None:
    config = home / "config.toml"
    config.write_text(text)
    config.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert str(err.value).startswith(str(config)) and message in str(err.value)


def test_a_missing_named_file_is_an_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_CLIENT_CONFIG", str(home / "nope.toml"))
    with pytest.raises(ConfigError, match=r"nope\.toml: no such client config file"):
        load_config()


# plait config ...-----------------------------------------------------------------------------


def test_get_contexts(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "get-contexts"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "   NAME  COORDINATOR                  TLS  TOKEN",
        "*  dev   127.0.0.1:7001               no   -",
        "   prod  10.0.0.1:7450,10.0.0.2:7450  yes  token-file",
    ]
    assert main(["--context", "prod", "config", "get-contexts", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["current"]) for c in doc["contexts"]] == [("dev", False), ("prod", True)]


def test_use_context_rewrites_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "config.toml"
    config.chmod(0o600)
    assert main(["config", "current-context"]) == 0
    assert capsys.readouterr().out == "dev\n"
    assert main(["config", "use-context", "prod"]) == 0
    assert config.read_text() == CONFIG.replace(
        'current-context = "dev"', 'current-context = "prod"'
    )
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert main(["config", "current-context"]) == 0
    assert capsys.readouterr().out.endswith("prod\n")
    assert main(["config", "use-context", "nope"]) == 2
    assert "use-context: no context 'nope'" in capsys.readouterr().err
    # A file without the line gets it before its first table.
    config.write_text(CONFIG.replace('current-context = "dev"\n', ""))
    assert main(["config", "use-context", "dev"]) == 0
    assert config.read_text().splitlines()[:3] == ["# my clusters", "", 'current-context = "dev"']


def test_config_without_a_file_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PLAIT_CLIENT_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["config", "get-contexts"]) == 2
    assert f"no client config file at {tmp_path}/plait/config.toml" in capsys.readouterr().err
