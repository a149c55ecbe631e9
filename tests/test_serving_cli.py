"""``xlx-fast serve`` as a user runs it: a real process that starts Ray, prints its URL, serves
on 127.0.0.1 and stops cleanly on Ctrl-C (SIGINT)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="ray[serve] is in the test extras")
requests = pytest.importorskip("requests")


def test_serve_command_round_trip():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "XLX_FAST_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "xlx_fast.cli", "serve", "--size", "tiny",
                             "--max-batch", "2", "--port", str(port), "--cpus-per-replica", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the app is deployed
        url = f"http://127.0.0.1:{port}"
        assert line.startswith(f"serving on {url}"), line
        t0 = time.monotonic()
        while requests.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() - t0 < 120
            time.sleep(0.2)
        body = {"prompt": "a red bus", "steps": 2}
        assert requests.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 401
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=60,
                          headers={"Authorization": "Bearer k1", "Accept": "image/png"})
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # impatient: a second Ctrl-C during the shutdown
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err[-2000:]
    assert "stopping" in err and "Traceback" not in err, err[-2000:]
