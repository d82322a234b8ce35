"""`python -m mmjax.serve` as a subprocess on 127.0.0.1 and a free port, for the test_serve_* files.

Every wait is bounded; the server's log is attached to any failure."""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def client(self, api_key: str = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=60, max_retries=0)

    def request(self, method: str, path: str, body=None, *, key: str | None = API_KEY, raw: bytes | None = None,
                timeout: float = 60) -> tuple[int, dict | str]:
        """(status, parsed JSON or text) of one plain HTTP request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def metrics(self) -> dict[str, float]:
        """{sample name + labels: value} of /metrics, parsed by prometheus_client's own parser."""
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.request("GET", "/metrics", key=None)
        assert status == 200, text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def wait_metric(self, name: str, want: float, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            got = self.metrics().get(name)
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


@contextlib.contextmanager
def serve(checkpoint, *args: str, start_timeout: float = 180, stop_timeout: float = 60):
    """Start the server, wait for /health, yield it; SIGTERM it afterwards (killed if it hangs)."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmjax-serve-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "MMJAX_COMPILE_CACHE": "0"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mmjax.serve", str(checkpoint), "--port", str(port),
                                 "--served-model-name", "tiny", "--log-level", "warning", *args],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log, "tiny")
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode} before /health:\n{srv.log_tail()}")
            try:
                if srv.request("GET", "/health", key=None, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy after {start_timeout}s:\n{srv.log_tail()}")
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"server did not exit {stop_timeout}s after SIGTERM:\n{srv.log_tail()}")


def image(seed: int, size=(32, 32)) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray((rs.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(img: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": text}]}]
