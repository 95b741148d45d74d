"""The web UI (``--ui-listen``): a real coordinator and worker, real HTTP, a real browser.

One cluster serves every test but the security ones: its workflows are submitted over gRPC and
read back through the UI's JSON and server-sent-event endpoints. The browser test drives
Debian's headless Chromium with chromedriver (Selenium): it opens a running workflow's page,
sees its DAG change state, follows a log line of the running action, and keeps screenshots
under ``$PLAIT_ARTIFACTS`` (or the test's temp dir), printing their paths.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plait.coordinator.config import CoordinatorConfig, load_config, parse_args
from plait.coordinator.ui.server import SECURITY_HEADERS, page_weight
from plait.errors import ConfigError
from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from plait.v1 import workflow_pb2 as wf
from tests.system.harness import Cluster, coordinator_argv, daemon_env, wait_for
from tests.system.specs import handler_action, python_action, workflow
from tests.tlsfixtures import Pki, pki  # noqa: F401

pytestmark = pytest.mark.system

SCRIPT_NAME = (
    '<script>window.__plait_pwned = 1</script><img src=x onerror="window.__plait_pwned=1">'
)


# ---- HTTP helpers ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One HTTP(S) request to the UI; any status is returned, not raised."""
    url = urllib.parse.urlsplit(base)
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(
            url.hostname or "", url.port, timeout=30, context=context
        )
    else:
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


@dataclass
class SseMessage:
    event: str
    data: Any
    id: str | None


def read_sse(
    base: str,
    path: str,
    until: Callable[[list[SseMessage]], bool],
    headers: dict[str, str] | None = None,
) -> list[SseMessage]:
    """Reads server-sent events until ``until(messages)`` holds (a 30 s socket timeout fails
    the test if the stream stalls)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read())
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        messages: list[SseMessage] = []
        event, data, event_id = "message", "", None
        while not until(messages):
            line = resp.readline().decode()
            assert line, "the stream ended early"
            line = line.rstrip("\n")
            if not line:
                if data:
                    messages.append(SseMessage(event, json.loads(data), event_id))
                event, data, event_id = "message", "", None
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line.startswith("id: "):
                event_id = line[4:]
        return messages
    finally:
        conn.close()


def ui_url(cluster: Cluster) -> str:
    url = json.loads(cluster.ready_file.read_text())["ui"]
    assert url, "the ready file names no UI"
    return str(url)


# ---- the shared cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator with the UI on loopback (authentication off) and one 4-slot worker."""
    c = Cluster(tmp_path_factory.mktemp("ui"))
    try:
        c.start_coordinator(ui_listen="127.0.0.1:0")
        c.add_worker("w1", slots=4)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def finished(ui_cluster: Cluster) -> str:
    """A finished workflow: two actions, a map over three items, a join."""
    spec = workflow(
        "ui-finished",
        [
            python_action("list", "print('listing'); plait_output({'items': ['a', 'b', 'c']})"),
            python_action(
                "each",
                "print('item', plait_inputs()['item']); plait_output({'ok': True})",
                needs=["list"],
                map=wf.MapSpec(over="list.items"),
            ),
            python_action("join", "plait_output({'total': 3})", needs=["list", "each"]),
        ],
    )
    workflow_id = ui_cluster.submit(spec)
    status = ui_cluster.wait_workflow(workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, status
    return workflow_id


def test_json_endpoints_show_what_the_api_shows(ui_cluster: Cluster, finished: str) -> None:
    base = ui_url(ui_cluster)
    page = request(base, "/")
    assert page.status == 200 and b'<script src="/static/app.js"' in page.body
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value, name
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]

    listed = request(base, "/api/workflows?state=succeeded&name=UI-FIN")
    assert listed.status == 200, listed.body
    assert listed.headers["X-Content-Type-Options"] == "nosniff"
    ids = [w["workflow_id"] for w in listed.json()["workflows"]]
    assert finished in ids
    assert request(base, "/api/workflows?state=RUNNING&name=ui-finished").json()["workflows"] == []
    bad = request(base, "/api/workflows?state=bogus")
    assert bad.status == 400 and bad.json()["fields"][0]["field"] == "state", bad.body
    too_long = request(base, "/api/workflows?name=" + "x" * 300)
    assert too_long.status == 400 and "the limit is 256" in too_long.json()["error"]

    detail = request(base, f"/api/workflows/{finished}").json()
    assert detail["workflow"]["state"] == "SUCCEEDED"
    assert detail["workflow"]["counts"]["SUCCEEDED"] == 6  # 3 actions + 3 map children
    spec = {a["action_id"]: a for a in detail["spec"]}
    assert spec["join"]["needs"] == ["list", "each"] and spec["join"]["join"] == {"kind": "ALL"}
    assert spec["each"]["map_over"] == "list.items"
    children = [a for a in detail["actions"] if a["parent_id"] == "each"]
    assert sorted(a["action_id"] for a in children) == ["each.0", "each.1", "each.2"]
    assert all(a["state"] == "SUCCEEDED" and a["worker_id"] == "w1" for a in children)
    assert all(a["started_ms"] and a["finished_ms"] for a in detail["actions"])

    action = request(base, f"/api/workflows/{finished}/actions/list").json()
    assert action["outputs"] == {"items": ["a", "b", "c"]}
    assert action["attempts"][0]["state"] == "SUCCEEDED"
    assert "listing" in action["attempts"][0]["stdout_tail"]

    missing = request(base, "/api/workflows/wf-doesnotexist")
    assert missing.status == 404 and "not found" in missing.json()["error"]
    invalid = request(base, "/api/workflows/" + urllib.parse.quote("bad id!"))
    assert invalid.status == 400 and invalid.json()["fields"][0]["field"] == "workflow_id"

    workers = request(base, "/api/workers").json()["workers"]
    assert [w["worker_id"] for w in workers] == ["w1"]
    assert workers[0]["slots"] == 4 and workers[0]["last_seen_s"] < 30
    assert workers[0]["connected_ms"] > 1_600_000_000_000


def test_events_resume_after_last_event_id(ui_cluster: Cluster, finished: str) -> None:
    base = ui_url(ui_cluster)
    path = f"/api/workflows/{finished}/events"
    whole = read_sse(base, path, lambda m: bool(m) and m[-1].event == "end")
    batches = [m for m in whole if m.event == "events"]
    sequences = [e["sequence"] for m in batches for e in m.data]
    assert sequences == sorted(sequences) and len(sequences) >= 10
    assert batches[0].data[0]["type"] == "WORKFLOW_SUBMITTED"
    assert batches[-1].data[-1]["type"] == "WORKFLOW_FINISHED"
    assert all(m.id == str(m.data[-1]["sequence"]) for m in batches)
    # A reconnect names the last event it saw: the stream goes on from the next one.
    middle = sequences[len(sequences) // 2]
    rest = read_sse(
        base, path, lambda m: bool(m) and m[-1].event == "end", {"Last-Event-ID": str(middle)}
    )
    resumed = [e["sequence"] for m in rest if m.event == "events" for e in m.data]
    assert resumed == [s for s in sequences if s > middle]
    bad = request(base, path, headers={"Last-Event-ID": "x"})
    assert bad.status == 400 and bad.json()["fields"][0]["field"] == "Last-Event-ID"
    # Refused before the stream starts: an HTTP error. The log stream starts at once (it
    # may wait long for an attempt), so its refusal is an `error` message.
    assert request(base, "/api/workflows/wf-doesnotexist/events").status == 404
    logs = read_sse(base, f"/api/workflows/{finished}/actions/nope/logs", bool)
    assert logs[0].event == "error" and logs[0].data["code"] == "NOT_FOUND", logs
    # A finished action's log: its tails, then the end.
    done = read_sse(
        base,
        f"/api/workflows/{finished}/actions/list/logs",
        lambda m: bool(m) and m[-1].event == "end",
    )
    ended = [m.data for m in done if m.event == "attempt_ended"]
    assert ended and "listing" in ended[0]["stdout_tail"], done


def test_why_pending_and_a_script_name_are_shown_as_text(ui_cluster: Cluster) -> None:
    base = ui_url(ui_cluster)
    workflow_id = ui_cluster.submit(workflow(SCRIPT_NAME, [handler_action("render", "render")]))
    try:

        def reason() -> str | None:
            actions = request(base, f"/api/workflows/{workflow_id}").json()["actions"]
            return actions[0]["reason"] if actions[0]["reason"].startswith("no connected") else None

        # The reason `plait status` gives: the API's own words.
        assert "handler 'render'" in wait_for("the reason", reason)
        body = request(base, f"/api/workflows/{workflow_id}").body
        assert b"<script" not in body and b"<img" not in body
        assert json.loads(body)["workflow"]["name"] == SCRIPT_NAME
    finally:
        ui_cluster.cancel(workflow_id)


# ---- security -------------------------------------------------------------------------------


def test_an_open_ui_beyond_loopback_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ui_listen '0\.0\.0\.0:8080' is not a loopback"):
        CoordinatorConfig(ui_listen="0.0.0.0:8080").validate()
    with pytest.raises(ConfigError, match="ui_listen 'nowhere': expected HOST:PORT"):
        CoordinatorConfig(ui_listen="nowhere").validate()
    assert load_config(parse_args(["--ui-listen", "off"]), {}).ui_listen is None
    from_env = load_config(parse_args([]), {"PLAIT_UI_LISTEN": "127.0.0.1:7460"})
    assert from_env.ui_listen == "127.0.0.1:7460"
    argv = coordinator_argv(
        store=f"sqlite:///{tmp_path}/plait.db",
        ready_file=tmp_path / "ready.json",
        overrides={"--ui-listen": "0.0.0.0:0"},
    )
    done = subprocess.run(
        argv, check=False, env=daemon_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "ui_listen '0.0.0.0:0' is not a loopback address" in done.stderr
    assert "TLS" in done.stderr and "authentication" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback


def test_ui_over_tls_needs_a_token_with_role_read(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    reader, worker = new_token(), new_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        token_file_text(
            [
                TokenEntry("alice", frozenset({Role.READ}), hash_token(reader)),
                TokenEntry("w9", frozenset({Role.WORKER}), hash_token(worker)),
            ]
        )
    )
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(
            ui_listen="127.0.0.1:0",
            auth_tokens=str(tokens),
            tls_cert=pki.coordinator.cert,
            tls_key=pki.coordinator.key,
        )
        base = ui_url(c)
        assert base.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=pki.ca)
        page = request(base, "/", context=ctx)  # the page itself holds no data
        assert page.status == 200
        for path in ("/api/workflows", "/api/workers", "/api/workflows/wf-x/events"):
            refused = request(base, path, context=ctx)
            assert refused.status == 401, (path, refused.body)
            assert refused.json()["login"] is True
            assert "needs role 'read'" in refused.json()["error"]
        bearer = {"Authorization": f"Bearer {reader}"}
        assert request(base, "/api/workflows", headers=bearer, context=ctx).status == 200
        denied = request(
            base, "/api/workflows", headers={"Authorization": f"Bearer {worker}"}, context=ctx
        )
        assert denied.status == 403 and "token:w9" in denied.json()["error"]
        wrong = request(
            base, "/api/workflows", headers={"Authorization": "Bearer plait_nope"}, context=ctx
        )
        assert wrong.status == 401 and "not valid" in wrong.json()["error"]
        assert reader not in wrong.body.decode() and "plait_nope" not in wrong.body.decode()

        # The login form: the token checked as the API would, then an HttpOnly cookie.
        login = request(
            base,
            "/api/session",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=json.dumps({"token": reader}).encode(),
            context=ctx,
        )
        assert login.status == 200, login.body
        assert login.json()["principal"] == "token:alice" and login.json()["roles"] == ["read"]
        cookie = login.headers["Set-Cookie"]
        for attribute in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/"):
            assert attribute in cookie, cookie
        jar = {"Cookie": cookie.split(";")[0]}
        assert request(base, "/api/workflows", headers=jar, context=ctx).status == 200
        bad_login = request(
            base,
            "/api/session",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=json.dumps({"token": worker}).encode(),
            context=ctx,
        )
        assert bad_login.status == 403 and "Set-Cookie" not in bad_login.headers
        cross = request(
            base,
            "/api/session",
            method="POST",
            headers={"Content-Type": "application/json", "Origin": "https://evil.example"},
            body=json.dumps({"token": reader}).encode(),
            context=ctx,
        )
        assert cross.status == 403 and "Set-Cookie" not in cross.headers
        assert "refused WorkflowService.ListWorkflows" in c.daemon("coordinator").log_tail()
    finally:
        c.close()


# ---- the browser ----------------------------------------------------------------------------


def _browser_tools() -> tuple[str, str]:
    """Chromium and chromedriver (Debian's); skips without them, fails under CI."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    message = "chromium, chromium-driver (apt-get install chromium chromium-driver) and selenium"
    if os.environ.get("CI"):
        pytest.fail(f"{message} are needed; .ci/run must install them")
    pytest.skip(f"{message} are not installed")


def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots are kept: ``$PLAIT_ARTIFACTS`` (CI keeps it), else the temp dir."""
    root = os.environ.get("PLAIT_ARTIFACTS")
    out = Path(root) if root else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


# A dozen actions in every state: done, mapped, failed, skipped, running, waiting (and why).
GATE_CODE = """
import time
print("training started", flush=True)
print("epoch 1/3 loss=0.42", flush=True)
while not os.path.exists({gate!r}):
    time.sleep(0.05)
print("epoch 3/3 loss=0.08", flush=True)
plait_output({{"model": "m-1"}})
"""


def demo_spec(gate: Path) -> wf.WorkflowSpec:
    ok = "plait_output({'ok': True})"
    return workflow(
        "nightly-build",
        [
            python_action("fetch", "plait_output({'shards': [1, 2, 3, 4, 5, 6]})"),
            python_action(
                "build",
                "print('building shard', plait_inputs()['item']); plait_output({'ok': 1})",
                needs=["fetch"],
                map=wf.MapSpec(over="fetch.shards"),
            ),
            python_action("lint", "print('style: 3 errors', file=sys.stderr); sys.exit(1)"),
            python_action("lint-report", ok, needs=["lint"]),
            python_action("docs", ok),
            python_action("package", ok, needs=["build", "docs"]),
            python_action("train", GATE_CODE.format(gate=str(gate)), needs=["package"]),
            python_action("evaluate", ok, needs=["train"]),
            handler_action("render-gpu", "render-gpu", needs=["package"]),
            python_action(
                "publish",
                ok,
                needs=["evaluate", "render-gpu", "lint-report"],
                join=wf.JoinPolicy(kind=wf.JOIN_KIND_AT_LEAST, at_least_count=2),
            ),
            python_action("notify", ok, needs=["publish"]),
        ],
    )


def test_browser_follows_a_running_workflow(
    ui_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chromium, chromedriver = _browser_tools()
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = ui_url(ui_cluster)
    gate = tmp_path / "gate"
    workflow_id = ui_cluster.submit(demo_spec(gate))
    hostile = ui_cluster.submit(workflow(SCRIPT_NAME, [python_action("x", "pass")]))
    out = artifacts_dir(tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        # The page redraws as events arrive: an element found may be replaced before it is
        # read, so every look is retried until it holds.
        waiter = WebDriverWait(
            driver,
            60,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )

        def wait(condition: Callable[[Any], Any], what: str = "") -> Any:
            return waiter.until(condition, message=f"waiting for {what or condition}")

        def node(action: str, state: str) -> Callable[[Any], Any]:
            css = f'g.node[data-action="{action}"][data-state="{state}"]'
            return lambda d: d.find_elements(By.CSS_SELECTOR, css)

        driver.get(f"{base}#/workflows/{workflow_id}?action=train")
        wait(lambda d: d.find_element(By.ID, "wf-name").text == "nightly-build")
        wait(node("train", "RUNNING"))
        # The running action's log, followed live (the action is still waiting on the gate).
        wait(lambda d: "epoch 1/3 loss=0.42" in d.find_element(By.ID, "log").text)
        wait(node("lint", "FAILED"))
        wait(node("lint-report", "SKIPPED"))
        wait(node("render-gpu", "READY"))
        # Why it waits, in the API's words, on the node (its tooltip).
        why = 'g.node[data-action="render-gpu"] title'
        wait(
            lambda d: (
                "no connected worker can run it"
                in (d.find_element(By.CSS_SELECTOR, why).get_attribute("textContent") or "")
            ),
            "the reason render-gpu waits",
        )
        join = 'g.node[data-action="publish"] text.join'
        wait(lambda d: d.find_element(By.CSS_SELECTOR, join).text.startswith("≥2 "), "M of N")
        # The map's six items, grouped under it and shown on demand.
        toggle = '[data-toggle="build"]'
        wait(lambda d: d.find_element(By.CSS_SELECTOR, toggle).click() or True, "the + of build")
        wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "rect.child.st-SUCCEEDED")) == 6)
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.timeline rect.bar"))
        running = out / "ui-workflow-running.png"
        driver.save_screenshot(str(running))

        gate.touch()
        wait(node("train", "SUCCEEDED"))
        wait(lambda d: "epoch 3/3 loss=0.08" in d.find_element(By.ID, "log").text)
        wait(node("evaluate", "SUCCEEDED"))
        done = out / "ui-workflow-after.png"
        driver.save_screenshot(str(done))

        # A workflow named with markup shows it as text, and nothing of it runs.
        driver.get(f"{base}#/workflows/{hostile}")
        wait(lambda d: d.find_element(By.ID, "wf-name").text == SCRIPT_NAME)
        driver.get(f"{base}#/")
        wait(lambda d: SCRIPT_NAME in d.find_element(By.ID, "workflows").text)
        assert driver.execute_script("return window.__plait_pwned") is None
        driver.get(f"{base}#/workers")
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-worker="w1"]'))
        with capsys.disabled():
            print(f"\nUI screenshots: {running} {done}")
    finally:
        driver.quit()
        ui_cluster.cancel(workflow_id)


def test_page_weight_is_small() -> None:
    # HTML + CSS + JavaScript the browser loads (docs/ui.md quotes it).
    weight = page_weight()
    assert 10_000 < weight < 60_000, weight
