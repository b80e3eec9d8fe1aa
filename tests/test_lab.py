"""`make lab` starts JupyterLab as root with the printed token, and refuses requests without it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_make_lab_prints_a_token_that_opens_the_server(repo_root, tmp_path):
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen(["make", "-s", "lab", f"PORT={port}"], cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        token = None
        deadline = time.monotonic() + 90
        while token is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.match(r"token: ([0-9a-f]{32})", line)
            token = m.group(1) if m else None
        assert token, "make lab printed no token"
        base = f"http://127.0.0.1:{port}/api/status"
        code = None
        while time.monotonic() < deadline:
            try:
                code = status(f"{base}?token={token}")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert code == 200
        assert status(base) == 403
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
