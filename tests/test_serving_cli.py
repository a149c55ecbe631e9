"""``xlx-fast serve`` as a user runs it: a real process that starts Ray, prints its URL, serves
on 127.0.0.1 and stops cleanly on Ctrl-C (SIGINT) or SIGTERM, printing only its own lines; one
that joins a shared cluster and leaves the other applications there running; and the mistakes
it refuses before Ray starts. Every test that starts Ray holds the file lock of the ``ray_lock`` fixture (tests/conftest.py) (two
Ray instances on one machine break each other)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="ray[serve] is in the test extras")
requests = pytest.importorskip("requests")

# generous: a loaded 2-core machine takes ~10 s to stop Ray (measured 6-10 s idle)
STOP_S = 180




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args, env=None):
    """``xlx-fast serve --size tiny`` in its own process group with SIGINT at its default (a
    background shell's children inherit it ignored)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "xlx_fast.cli", "serve", "--size", "tiny",
                             "--max-batch", "2", "--cpus-per-replica", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_serving(proc, port):
    line = proc.stdout.readline()  # printed once the app is deployed
    url = f"http://127.0.0.1:{port}"
    assert line.startswith(f"serving on {url}"), (line, proc.stderr.read() if proc.poll() is not None else "")
    _poll(lambda: requests.get(f"{url}/health", timeout=10).status_code == 200, "serve's /health to answer 200")
    return url


HANG_GUARD_S = 180  # only stops a test that would wait forever: nothing here is timed


def _poll(done, what, every_s=0.2, alive=lambda: True):
    """Wait until ``done()``; fail only if the process died (``alive``) or the hang guard ran out."""
    t0 = time.monotonic()
    while not done():
        if not alive():
            pytest.fail(f"gave up waiting for {what}: the process it needs exited")
        if time.monotonic() - t0 > HANG_GUARD_S:
            pytest.fail(f"gave up waiting for {what} after the {HANG_GUARD_S} s hang guard")
        time.sleep(every_s)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's agents outlive a parent killed alone
    except ProcessLookupError:
        pass


def _only_our_lines(err):
    """A clean start and stop print xlx_fast's own line and nothing of Ray's."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["stopping"], err[-3000:]


def test_serve_command_round_trip(ray_lock):
    port = _free_port()
    proc = _start("--port", str(port), "--captions", "--answer-task", "vqa",
                  env={"XLX_FAST_API_KEY": "k1"})
    try:
        url = _wait_serving(proc, port)
        body = {"prompt": "a red bus", "steps": 2}
        assert requests.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 401
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=60,
                          headers={"Authorization": "Bearer k1", "Accept": "image/png"})
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        # the other two tasks, turned on by --captions and --answer-task
        auth, ids = {"Authorization": "Bearer k1"}, list(range(64))
        r = requests.post(f"{url}/v1/captions", json={"cluster_ids": ids, "length": 4}, headers=auth,
                          timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["ids"]) == 4, r.text
        r = requests.post(f"{url}/v1/answers", json={"question": "what is it?", "cluster_ids": ids},
                          headers=auth, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 5, r.text
        assert requests.get(f"{url}/openapi.json", timeout=10).status_code == 401
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # impatient: a second Ctrl-C during the shutdown
        _, err = proc.communicate(timeout=STOP_S)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-2000:]
    _only_our_lines(err)


def test_serve_stops_cleanly_on_sigterm(ray_lock):
    """What a container runtime or systemd sends: the same clean stop as Ctrl-C, no crash dump."""
    port = _free_port()
    proc = _start("--port", str(port))
    try:
        _wait_serving(proc, port)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_S)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-2000:]
    _only_our_lines(err)


@pytest.mark.parametrize("args,env,msg", [
    (["--device", "tpu"], {}, "--device tpu"),
    (["--checkpoint", "/nonexistent/E.pth", "--centroids", "/nonexistent/c.npy",
      "--generator", "/nonexistent/G.pth"], {}, "--checkpoint /nonexistent/E.pth: no such file"),
    (["--host", "0.0.0.0"], {}, "--allow-no-key"),
    (["--host", "0.0.0.0", "--api-key", ""], {"XLX_FAST_API_KEY": ""}, "--allow-no-key"),
])
def test_serve_refuses_before_ray_starts(args, env, msg):
    """One error line and exit 2, before Ray starts (a replica that cannot build would be
    restarted forever while the command said 'serving on ...')."""
    env = {k: v for k, v in os.environ.items() if k != "XLX_FAST_API_KEY"} | env
    proc = subprocess.Popen([sys.executable, "-m", "xlx_fast.cli", "serve", "--size", "tiny",
                             "--port", str(_free_port()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=STOP_S)
    finally:
        _kill_group(proc)  # had it started Ray, its processes go too
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert msg in lines[0], lines
    assert "serving on" not in out


def test_serve_on_a_shared_cluster_leaves_the_other_applications(ray_lock):
    """Joined with --address, a stop deletes only the application this process deployed: Serve,
    another user's application and the cluster keep running."""
    gcs_port, http_port = _free_port(), _free_port()
    # token authentication, as on a real shared cluster; every process here reads the token
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    # the ray command of this interpreter's environment, whether or not it is on PATH
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus", "2",
                             "--include-dashboard", "false", "--port", str(gcs_port),
                             "--node-ip-address", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    proc = None
    address = f"127.0.0.1:{gcs_port}"
    other = (
        "import sys, ray\nfrom ray import serve\n"
        "@serve.deployment(ray_actor_options={'num_cpus': 0})\n"
        "class Other:\n    async def __call__(self, request):\n        return 'other'\n"
        f"ray.init(address={address!r})\n"
        f"serve.start(http_options={{'host': '127.0.0.1', 'port': {http_port}}})\n"
        "serve.run(Other.bind(), name='other', route_prefix='/other')\n"
    )
    try:
        def other_app_deployed():  # `ray start --block` prints nothing when ready: retry
            return subprocess.run([sys.executable, "-c", other], env=env, timeout=300,
                                  capture_output=True, text=True).returncode == 0

        _poll(other_app_deployed, "the other user's app on the shared cluster", every_s=2,
              alive=lambda: head.poll() is None)
        base = f"http://127.0.0.1:{http_port}"
        assert requests.get(f"{base}/other", timeout=30).text == "other"
        proc = _start("--address", address, "--port", str(http_port), env={"RAY_AUTH_MODE": "token"})
        _wait_serving(proc, http_port)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=STOP_S)
        assert proc.returncode == 0, err[-2000:]
        assert requests.get(f"{base}/other", timeout=30).text == "other"  # still there
        assert requests.get(f"{base}/health", timeout=30).status_code == 404  # ours is gone
        assert head.poll() is None  # the cluster too
    finally:
        if proc is not None:
            _kill_group(proc)
        head.terminate()  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        finally:
            _kill_group(head)
        # a head killed outright leaves its address where a later ray.init() would join it
        marker = "/tmp/ray/ray_current_cluster"
        if os.path.exists(marker) and open(marker).read().strip().endswith(f":{gcs_port}"):
            os.remove(marker)
