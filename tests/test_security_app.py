"""Issue 15 through the app: evaluations owned, capped and cancelled when the client leaves;
global and per-client caps that fresh owner tokens cannot get around; page events refused to
callers that loaded no page; runs from the command line claimed only by an admin setting;
server paths never probed; a damaged run never breaks the list."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from helpers import tiny_config, wait_until
from iet_core import ConfigError, Run, train
from iet_core.evaluate import list_evals
from iet_core.jobs import JobManager
from iet_core.owners import JobError

REPO = Path(__file__).resolve().parents[1]
OWNER, OTHER = "owner-token-for-security", "someone-else-entirely"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import app

    demo, ctx = app.build_app(tmp_path_factory.mktemp("runs"), max_eval_work=2_000_000)
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        yield url, demo, ctx
    finally:
        ctx.evaluations.close()
        ctx.jobs.shutdown(timeout=60)
        demo.close()


@pytest.fixture(scope="module")
def finished_run(server):
    url, _, ctx = server
    client = Client(url, verbose=False)
    run_id = client.predict(tiny_config("ddpm", rounds=1).to_json(), OWNER, api_name="/start_run")["run_id"]
    assert ctx.jobs.wait(run_id, 180) == "finished"
    return run_id


def test_a_server_path_as_data_source_is_refused_alike_whether_it_exists_or_not(server):
    url, _, ctx = server
    client = Client(url, verbose=False)
    before = sorted(p.name for p in ctx.runs_root.iterdir())
    messages = set()
    for source in (str(ctx.runs_root), str(ctx.runs_root / "missing"), "hf:../../etc", "/etc/passwd"):
        config = tiny_config("ddpm")
        config.data.source = source
        with pytest.raises(AppError) as refused:
            client.predict(config.to_json(), OWNER, api_name="/start_run")
        messages.add(str(refused.value).replace(repr(source), "SOURCE"))
    assert len(messages) == 1 and "not available on this server" in messages.pop()
    for section, setting, value, refusal in (("model", "pretrained", "/etc", "not available on this server"),
                                             ("eval", "fid_cache", "/tmp/anywhere", "admin's to set"),
                                             ("eval", "fid_weights", "/etc/passwd", "admin's to set")):
        tree = tiny_config("ddpm").to_dict()
        tree[section][setting] = value
        with pytest.raises(AppError, match=refusal):
            client.predict(json.dumps(tree), OWNER, api_name="/start_run")
    assert sorted(p.name for p in ctx.runs_root.iterdir()) == before  # no run folder made


def test_a_run_with_a_damaged_config_is_listed_as_damaged_and_breaks_nothing(server):
    url, _, ctx = server
    client = Client(url, verbose=False)
    damaged = ctx.runs_root / "20260101-000000-huge-abcdef"
    damaged.mkdir()
    tree = tiny_config("ddpm").to_dict()
    tree["train"]["rounds"] = 10**30  # written by hand or by an old version
    (damaged / "config.json").write_text(json.dumps(tree))
    try:
        rows = {row["run_id"]: row for row in client.predict(api_name="/list_runs")}
        assert rows[damaged.name]["state"] == "damaged" and "train.rounds" in rows[damaged.name]["message"]
        with pytest.raises(AppError, match="train.rounds"):
            client.predict(damaged.name, api_name="/run_status")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the plain HTTP status says the same
            urllib.request.urlopen(f"{url}status/{damaged.name}", timeout=30)
        assert refused.value.code == 422 and "train.rounds" in json.load(refused.value)["detail"]
    finally:
        (damaged / "config.json").unlink()
        damaged.rmdir()


def test_evaluations_are_for_the_owner_and_capped(server, finished_run):
    url, _, _ = server
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="only its owner can evaluate"):
        client.predict(finished_run, 4, 2, OTHER, api_name="/evaluate_run")
    with pytest.raises(AppError, match="this server allows 2,000,000 per evaluation"):
        client.predict(finished_run, 4000, 1000, OWNER, api_name="/evaluate_run")
    result = client.predict(finished_run, 4, 2, OWNER, api_name="/evaluate_run")
    assert result["summary"]["num_samples"] == 4


@contextlib.contextmanager
def evaluation_page(url: str, demo, data: list, session: str = "evaluation-page"):
    """An evaluation asked the way a page asks it (join the queue, listen to the event stream),
    with the page staying until the block ends, then leaving (the connection closed)."""
    index = next(i for i, fn in demo.fns.items() if fn.api_name == "evaluate_run")
    with httpx.Client(base_url=url, timeout=60) as http:
        joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            # Hold the line iterator: dropping it would close the connection at once (the server
            # would see the page leave, which is what the previous version of these tests did by accident).
            lines = stream.iter_lines()
            next(line for line in lines if "process_starts" in line)
            yield


def test_an_evaluation_stops_when_its_client_goes_away(server, finished_run):
    url, demo, ctx = server
    run = ctx.jobs.run(finished_run)
    saved = set(list_evals(run))
    with evaluation_page(url, demo, [finished_run, 2000, 1000, OWNER]):
        wait_until(lambda: ctx.evaluations.active == 1, what="the evaluation to start")
    # then the client leaves, closing the connection
    wait_until(lambda: ctx.evaluations.active == 0, what="the abandoned evaluation to stop")
    assert set(list_evals(run)) == saved  # cancelled: nothing saved


def test_page_events_are_refused_to_callers_that_loaded_no_page(server):
    url, demo, ctx = server
    private = next(fn for fn in demo.fns.values() if fn.api_visibility == "private" and fn.api_name == "fill")
    public = next(fn for fn in demo.fns.values() if fn.api_name == "list_runs")
    data = [None] * len(private.inputs)
    client = Client(url, verbose=False)
    with pytest.raises(ValueError, match="Cannot find a function"):  # gradio_client's own check
        client.predict(*data, api_name="/fill")
    assert isinstance(client.predict(api_name="/list_runs"), list)  # public endpoints keep working
    with httpx.Client(base_url=url, timeout=60) as http:
        def call(page_cookie: str | None = None) -> list[int]:
            http.cookies.clear()
            if page_cookie is not None:
                http.cookies.set("iet-page", page_cookie)
            return [http.post("gradio_api/queue/join", json={"data": data, "fn_index": private._id,
                                                             "session_hash": "scripted"}).status_code,
                    http.post("gradio_api/call/fill", json={"data": data}).status_code,
                    http.post("gradio_api/run/fill", json={"data": data}).status_code,
                    # a public name with a private fn_index: the index is what Gradio would run
                    http.post("gradio_api/run/list_runs", json={"data": data, "fn_index": private._id}).status_code]

        assert call() == [403] * 4
        assert call("forged.0123456789abcdef") == [403] * 4
        refusal = http.post("gradio_api/queue/join", json={"data": data, "fn_index": private._id, "session_hash": "x"})
        assert "runs only from a page loaded in a browser" in refusal.json()["detail"]
        assert http.post("gradio_api/queue/join", json={"data": [], "fn_index": public._id,
                                                        "session_hash": "scripted"}).status_code == 200
        # A public call padded past what an event call needs is not buffered: refused as a page event.
        padded = {"data": ["x" * (2 << 20)], "fn_index": public._id, "session_hash": "padded"}
        assert http.post("gradio_api/queue/join", json=padded).status_code == 403
        page = http.get("data")  # what a browser does first: the page, which sets the cookie
        assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=Strict" in page.headers["set-cookie"]
        assert call(page.cookies["iet-page"]) == [200] * 4
        for shown in ("config", "gradio_api/info"):  # what every visitor sees holds no key to the cookie
            assert ctx.page_key not in http.get(shown).text


def test_fresh_owner_tokens_cannot_get_around_the_global_caps(tmp_path):
    jobs = JobManager(tmp_path, max_live_jobs=2, max_steps_per_run=1_000)
    first = jobs.submit(tiny_config("ddpm", rounds=100), "token-number-one")
    jobs.pause(first, "token-number-one")
    jobs.submit(tiny_config("ddpm", rounds=1), "token-number-two")
    with pytest.raises(JobError, match="2 runs are training or waiting"):
        jobs.submit(tiny_config("ddpm", rounds=1), "token-number-three")
    with pytest.raises(JobError, match="this server allows 1,000"):
        jobs.submit(tiny_config("ddpm", rounds=1_000), "token-number-four")
    jobs.shutdown()


def test_fresh_owner_tokens_from_one_client_hit_the_per_client_caps(tmp_path):
    import app

    demo, ctx = app.build_app(tmp_path, max_live_jobs_per_client=1, max_evals_per_client=1, max_eval_work=2_000_000)
    _, url, _ = app.launch(demo, ctx, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    # Each owner's client forges its own X-Forwarded-For: without --proxy-hops both are one client.
    clients = {owner: Client(url, verbose=False, headers={"X-Forwarded-For": forged})
               for owner, forged in ((OWNER, "203.0.113.9"), (OTHER, "198.51.100.1"))}
    try:
        finished = {}
        for owner, client in clients.items():  # one at a time: a finished run leaves room for the next
            finished[owner] = client.predict(tiny_config("ddpm", rounds=1).to_json(), owner, api_name="/start_run")["run_id"]
            assert ctx.jobs.wait(finished[owner], 180) == "finished"
        long_run = clients[OWNER].predict(tiny_config("ddpm", rounds=1000).to_json(), OWNER, api_name="/start_run")["run_id"]
        with pytest.raises(AppError, match=r"limit per client \(--max-live-jobs-per-client 1\): stop one or wait"):
            clients[OTHER].predict(tiny_config("ddpm", rounds=1).to_json(), OTHER, api_name="/start_run")
        clients[OWNER].predict(long_run, OWNER, api_name="/stop_run")

        # The server's one running place is taken (by someone elsewhere), so the owner's evaluation
        # waits in line for as long as the test needs it: it counts against the owner's client.
        with ctx.evaluations.slot("someone-elsewhere", client="192.0.2.1"):
            with evaluation_page(url, demo, [finished[OWNER], 4, 2, OWNER]):
                wait_until(lambda: ctx.evaluations.queued == 1, what="the owner's evaluation to wait in line")
                with pytest.raises(AppError, match=r"limit per client \(--max-evals-per-client 1\): wait for one"):
                    clients[OTHER].predict(finished[OTHER], 2, 2, OTHER, api_name="/evaluate_run")
            # the owner's page left: its evaluation gives up its place before it ever ran
            wait_until(lambda: ctx.evaluations.queued == 0, what="the abandoned evaluation to leave the line")
            assert ctx.evaluations.active == 1
        assert ctx.jobs.wait(long_run, 180) == "stopped"
    finally:
        ctx.evaluations.close()
        ctx.jobs.shutdown(timeout=60)
        demo.close()


def test_the_client_address_is_the_connection_unless_the_admin_names_proxies():
    from starlette.requests import Request

    from pages.access import client_address

    def request(*forwarded: str) -> gr.Request:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return gr.Request(Request({"type": "http", "headers": headers, "client": ("10.0.0.7", 4321)}))

    assert client_address(request("203.0.113.9")) == "10.0.0.7"  # the header ignored
    assert client_address(request("203.0.113.9"), proxy_hops=1) == "203.0.113.9"
    # entries left of the proxy's own are whatever the client sent
    assert client_address(request("198.51.100.1, 203.0.113.9"), proxy_hops=1) == "203.0.113.9"
    assert client_address(request("198.51.100.1", "203.0.113.9"), proxy_hops=1) == "203.0.113.9"
    assert client_address(request("198.51.100.1, 203.0.113.9"), proxy_hops=2) == "198.51.100.1"
    assert client_address(request(), proxy_hops=1) == "10.0.0.7"  # not through the proxy
    assert client_address(None) is None


def test_the_per_client_cap_counts_runs_started_and_resumed_by_one_client(tmp_path):
    asking = {"client": "10.0.0.1"}
    jobs = JobManager(tmp_path, max_live_jobs_per_client=1, client_of=lambda: asking["client"])
    first = jobs.submit(tiny_config("ddpm", rounds=100), "token-number-one")
    jobs.stop(first, "token-number-one")
    assert jobs.wait(first, 120) == "stopped"
    jobs.submit(tiny_config("ddpm", rounds=100), "token-number-two")  # the stopped run is not live
    with pytest.raises(JobError, match="--max-live-jobs-per-client 1"):
        jobs.resume(first, "token-number-one")
    asking["client"] = "10.0.0.2"
    jobs.resume(first, "token-number-one")  # another client has room
    assert jobs.status(first)["state"] in ("queued", "running")
    jobs.shutdown()


HOLD_LOCK = """
import signal, sys
from iet_core.runs import Run
Run(sys.argv[1]).writer_lock("the command line").acquire()
print("locked", flush=True)
signal.pause()  # hold the lock until the test kills this process
"""


def test_a_command_line_run_is_claimed_only_by_an_admin_setting_and_never_while_it_trains(tmp_path):
    cli_run = train(tiny_config("ddpm", rounds=2), runs_root=tmp_path)
    status = json.loads((cli_run.path / "status.json").read_text())
    status["state"] = "stopped"
    (cli_run.path / "status.json").write_text(json.dumps(status))
    with pytest.raises(JobError, match="made outside the app"):
        JobManager(tmp_path).resume(cli_run.id, OWNER)
    admin = JobManager(tmp_path, claim_unowned=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cli_run.path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        shown = admin.status(cli_run.id)
        assert shown["state"] == "running" and "the command line (pid" in shown["message"]
        with pytest.raises(JobError, match="being trained by the command line"):
            admin.resume(cli_run.id, OWNER)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    admin.resume(cli_run.id, OWNER)
    assert admin.wait(cli_run.id, 180) == "finished"


def test_uploads_are_bounded_before_they_are_read(tmp_path, server):
    from pages.data import persist_upload

    import app

    _, demo, _ = server
    assert demo.max_file_size == app.MAX_UPLOAD_MB * 2**20  # the server refuses larger uploads itself
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(3 * 2**30)  # sparse: 3 GB claimed, nothing on disk or in memory
    with pytest.raises(ConfigError, match="the upload is too large"):
        persist_upload([str(huge)], tmp_path / "runs", 8, 1)


def test_download_folders_expire(monkeypatch):
    from pages import common

    first = common.download_dir("old")
    (first / "checkpoint.zip").write_bytes(b"zip")
    stale = time.time() - common.DOWNLOAD_TTL_SECONDS - 1
    os.utime(first, (stale, stale))
    second = common.download_dir("new")
    assert second.exists() and not first.exists()


def test_sigterm_during_an_evaluation_cancels_it_and_exits_cleanly(tmp_path):
    import socket

    from gradio_client.utils import Status

    runs = tmp_path / "runs"
    run = train(tiny_config("ddpm", rounds=1), runs_root=runs)  # made outside the app: claimable by the flag
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    app = subprocess.Popen([sys.executable, "app.py", "--runs-dir", str(runs), "--port", str(port), "--claim-cli-runs",
                            "--max-eval-work", "100000000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        for line in app.stdout:  # the server says where it listens once it is up
            if f":{port}" in line:
                break
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(run.id, 50_000, 1000, OWNER, api_name="/evaluate_run")
        wait_until(lambda: job.status().code == Status.PROCESSING, what="the evaluation to start")
        app.send_signal(signal.SIGTERM)
        _, errors = app.communicate(timeout=120)
    finally:
        app.kill()
    assert app.returncode == 0, errors[-2000:]
    assert "terminate called" not in errors
    assert not list_evals(Run(run.path))  # cancelled: nothing saved


def test_a_session_sent_by_a_client_is_read_like_any_other_input():
    from pages import common

    assert common.session_data({"data": {"source": "digits", "resolution": 8}}).resolution == 8
    for forged in ({"data": {"source": "digits", "smuggled": 1}}, {"data": {"resolution": 1e30}}, {"data": "x"}):
        assert common.session_data(forged) is None
