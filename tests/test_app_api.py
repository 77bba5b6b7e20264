"""The app through its programmatic API with a real server and gradio_client: start a tiny run,
poll it to the end, evaluate it, read the results; queueing, ownership and bad input."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from helpers import tiny_config, wait_until
from iet_core.runs import Run

OWNER = "owner-token-for-tests"


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return Client(url, verbose=False)


def wait_for(client, run_id, states=("finished", "stopped", "failed"), timeout=180):
    def done():
        status = client.predict(run_id, api_name="/run_status")
        return status if status["state"] in states else None

    return wait_until(done, timeout, f"run {run_id} to reach {'/'.join(states)}", interval=0.2)


def test_train_poll_evaluate_and_read_results(client):
    config = tiny_config("iet-agc")
    started = client.predict(config.to_json(), OWNER, api_name="/start_run")
    assert started["mode"] == "iet-agc" and started["state"] in ("queued", "running")
    done = wait_for(client, started["run_id"])
    assert done["state"] == "finished", done
    assert done["global_step"] == done["total_steps"] == 2 * 2 * 3  # rounds x shards x local steps

    result = client.predict(started["run_id"], 8, 2, OWNER, api_name="/evaluate_run")
    summary, table = result["summary"], result["table"]
    assert summary["num_samples"] == len(table) == 8
    assert summary["num_training"] == config.data.subset
    assert 0.0 <= summary["memorized_fraction"] <= 1.0
    assert summary["memorized_count"] == sum(row["memorized"] for row in table)
    assert all(row["l2_nearest"] <= row["l2_second"] for row in table)

    saved = client.predict(started["run_id"], api_name="/latest_evaluation")
    assert saved["summary"]["memorized_fraction"] == summary["memorized_fraction"]
    listed = {row["run_id"]: row for row in client.predict(api_name="/list_runs")}
    assert listed[started["run_id"]]["state"] == "finished"


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_plain_http_status_is_run_status_outside_the_queue(client, app_server):
    url, ctx = app_server
    run_id = client.predict(tiny_config("ddpm", rounds=1).to_json(), OWNER, api_name="/start_run")["run_id"]
    assert ctx.jobs.wait(run_id, 180) == "finished"
    assert get_json(f"{url}status/{run_id}") == (200, client.predict(run_id, api_name="/run_status"))
    code, body = get_json(f"{url}status/no-such-run")
    assert code == 404 and "no run 'no-such-run'" in body["detail"]
    for tricky in ("..", "..%5C..%5Cetc", "..%2F..%2Fetc%2Fpasswd", "%2E%2E"):
        code, body = get_json(f"{url}status/{tricky}")
        assert code == 404, (tricky, body)
        assert str(ctx.runs_root) not in json.dumps(body) and "Traceback" not in json.dumps(body)


def test_queue_positions_and_ownership(client):
    first = client.predict(tiny_config("ddpm").to_json(), OWNER, api_name="/start_run")["run_id"]
    client.predict(first, OWNER, api_name="/pause_run")
    second = client.predict(tiny_config("iet").to_json(), OWNER, api_name="/start_run")
    assert second["state"] == "queued" and second["queue_position"] == 1

    with pytest.raises(AppError, match="another browser session"):
        client.predict(first, "someone-else-entirely", api_name="/stop_run")
    with pytest.raises(AppError, match="without AGC"):
        client.predict(first, 0.3, OWNER, api_name="/set_skip_lambda")

    removed = client.predict(second["run_id"], OWNER, api_name="/stop_run")  # off the queue, never started
    assert removed["state"] == "created" and removed["queue_position"] is None
    client.predict(first, OWNER, api_name="/resume_run")
    assert wait_for(client, first)["state"] == "finished"


def test_bad_input_gets_a_clear_message(client):
    config = tiny_config("iet-agc")
    config.method.agc.skip_lambda = 3.0
    with pytest.raises(AppError, match="skip_lambda"):
        client.predict(config.to_json(), OWNER, api_name="/start_run")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict("{not json", OWNER, api_name="/start_run")
    with pytest.raises(AppError, match="no run"):
        client.predict("no-such-run", api_name="/run_status")
    with pytest.raises(AppError, match="owner token"):
        client.predict(tiny_config().to_json(), "", api_name="/start_run")


def test_runs_are_listed_after_a_restart(client, app_server):
    import app

    _, ctx = app_server
    listed = client.predict(api_name="/list_runs")
    assert listed, "the tests above leave runs behind"
    demo, restarted = app.build_app(ctx.runs_root)  # a second app on the same folder: a restart
    _, url, _ = app.launch(demo, restarted, prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        again = Client(url, verbose=False).predict(api_name="/list_runs")
    finally:
        demo.close()
    assert [(r["run_id"], r["state"]) for r in again] == [(r["run_id"], r["state"]) for r in listed]


def test_closing_the_app_stops_running_jobs_with_a_checkpoint(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from iet_core.runs import Run

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, "app.py", "--runs-dir", str(tmp_path), "--port", str(port)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def connected():
            assert server.poll() is None, server.stdout.read()
            try:
                return Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                return None

        client = wait_until(connected, what="the app to listen", interval=0.2)
        run_id = client.predict(tiny_config("iet-agc", rounds=50).to_json(), OWNER, api_name="/start_run")["run_id"]
        wait_until(lambda: client.predict(run_id, api_name="/run_status")["global_step"] >= 3,
                   what="three training steps", interval=0.1)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    status = Run.open(tmp_path / run_id).status()
    assert status["state"] == "stopped" and 3 <= status["global_step"] < 50 * 2 * 3
    assert Run.open(tmp_path / run_id).latest_checkpoint() is not None


def test_two_sessions_at_once_queue_in_order_and_cannot_stop_each_other(app_server):
    import threading

    url, _ = app_server
    carol, alice, bob = (Client(url, verbose=False) for _ in range(3))
    # A long run holds the only training slot, so both sessions' runs queue behind it however
    # fast or loaded the machine is; carol stops it once the checks on the queue are done.
    blocker = carol.predict(tiny_config("ddpm", rounds=5_000).to_json(), "token-of-carol-1234",
                            api_name="/start_run")["run_id"]
    started, barrier = {}, threading.Barrier(2)

    def start(name, client):
        barrier.wait()
        started[name] = client.predict(tiny_config("ddpm", rounds=2).to_json(), f"token-of-{name}-1234",
                                       api_name="/start_run")

    threads = [threading.Thread(target=start, args=(name, client)) for name, client in (("alice", alice), ("bob", bob))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    a, b = started["alice"]["run_id"], started["bob"]["run_id"]
    assert started["alice"]["state"] == started["bob"]["state"] == "queued"
    assert sorted(s["queue_position"] for s in started.values()) == [1, 2]
    with pytest.raises(AppError, match="another browser session"):
        bob.predict(a, "token-of-bob-1234", api_name="/stop_run")
    with pytest.raises(AppError, match="another browser session"):
        alice.predict(b, "token-of-alice-1234", api_name="/stop_run")
    carol.predict(blocker, "token-of-carol-1234", api_name="/stop_run")
    finished_a, finished_b = wait_for(alice, a), wait_for(bob, b)
    assert finished_a["state"] == finished_b["state"] == "finished"
    first, second = sorted((a, b), key=lambda run_id: started["alice" if run_id == a else "bob"]["queue_position"])
    root = _runs_root(app_server)
    assert Run.open(root / first).status()["updated"] < Run.open(root / second).status()["updated"]
    # Ownership is checked before state: a finished run's non-owner gets the same refusal.
    with pytest.raises(AppError, match="another browser session"):
        bob.predict(a, "token-of-bob-1234", api_name="/stop_run")
    with pytest.raises(AppError, match="only its owner can delete"):
        bob.predict(a, "token-of-bob-1234", api_name="/delete_run")
    remaining = alice.predict(a, "token-of-alice-1234", api_name="/delete_run")
    assert a not in {row["run_id"] for row in remaining}
    wait_for(carol, blocker)


def _runs_root(app_server):
    return app_server[1].jobs.runs_root


def test_the_server_serves_no_files_outside_its_runs_and_assets(app_server):
    import urllib.error
    import urllib.request
    from pathlib import Path

    url, _ = app_server
    for path in ("/etc/passwd", str(Path(__file__).resolve()), str(Path(__file__).resolve().parents[1] / "app.py")):
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=10) as response:
                code = response.status
        except urllib.error.HTTPError as err:
            code = err.code
        assert code in (403, 404), (path, code)
