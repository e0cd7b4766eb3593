"""A vLLM OpenAI-compatible server: started by opdkit on 127.0.0.1 (`LaunchedServer`) or reached at a URL
(`HTTPClient`: JSON calls with timeouts and retries). Used by the served teacher (`opdkit.teacher.server`) and the
vLLM rollout backend (`opdkit.rollout.vllm`); vLLM itself lives in its own environment (scripts/setup_vllm.sh) and
is only ever spoken to over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from opdkit.errors import RunFailed, UserError, one_line


class ServerError(RunFailed):
    """The teacher server failed during a run (down after retries, or a malformed answer): one line, exit 3."""


# ----------------------------------------------------------------------------------------------------------- HTTP
class HTTPClient:
    def __init__(self, url: str, timeout_s: float, retries: int, what: str = "teacher",
                 knob: str = "teacher.server.url"):
        self.url, self.timeout_s, self.retries = url.rstrip("/"), float(timeout_s), int(retries)
        self.what, self.knob = what, knob

    def call(self, path: str, payload: dict | None = None, *, retries: int | None = None, timeout_s=None) -> dict:
        """JSON request (GET without payload, else POST); retried on connection errors, timeouts and 5xx. A 4xx
        answer raises UserError at once (its message is the server's)."""
        data = None if payload is None else json.dumps(payload).encode()
        last = ""
        tries = self.retries if retries is None else retries
        for attempt in range(tries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                    body = r.read()
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                if e.code < 500:
                    try:
                        text = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        pass
                    raise UserError(f"the {self.what} server {self.url}{path} refused the request (HTTP {e.code}): "
                                    f"{one_line(text)[:300]}") from None
                last = f"HTTP {e.code}: {one_line(text)[:200]}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = one_line(getattr(e, "reason", None) or e)[:200]
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise ServerError(f"the {self.what} server {self.url}{path} answered something that is not JSON "
                                  f"({body[:80]!r})") from None
        raise ServerError(f"the {self.what} server {self.url}{path} did not answer after {tries + 1} tries ({last}); "
                          f"check that it is running ({self.knob}) and resume with resume=true")


def resolve_python(path: str) -> str:
    """A vLLM Python given as a relative path (the default .venv-vllm/bin/python) is looked up in the working
    directory, then in the opdkit checkout this package runs from."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file():
        return str(p)
    repo = Path(__file__).resolve().parents[1] / p
    return str(repo) if repo.is_file() else str(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the trainer dies (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LaunchedServer:
    """`vllm serve` of a local model on 127.0.0.1 in its own process group; `stop()` ends it (also at exit)."""

    def __init__(self, model_path: str, *, python: str, dtype: str, max_logprobs: int, kv_cache_gib: int,
                 extra_args: list[str], startup_timeout_s: float, max_model_len: int | None = None,
                 served_model_name: str = "teacher", env: dict[str, str] | None = None, what: str = "teacher"):
        python = resolve_python(python)
        if not Path(python).is_file():
            raise UserError(f"the {what} server's Python {python} does not exist; make it with `bash "
                            "scripts/setup_vllm.sh` (a venv with vllm) or point it at a Python that has vllm")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="opdkit-vllm-", suffix=".log")[1])
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", served_model_name, "--dtype", dtype,
               "--max-logprobs", str(max_logprobs), "--disable-log-stats", "--uvicorn-log-level", "warning"]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        cmd += list(extra_args)
        # PYTHONSAFEPATH: the working directory is not on the server's import path (a yaml.py there never runs)
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(int(kv_cache_gib)), PYTHONUNBUFFERED="1",
                   PYTHONSAFEPATH="1", **(env or {}))
        env.setdefault("OMP_NUM_THREADS", "1")
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        import atexit

        atexit.register(self.stop)
        t0, client = time.monotonic(), HTTPClient(self.url, 5.0, 0)
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                self.stop()
                raise UserError(f"the {what} server (vllm serve {model_path}) exited with code "
                                f"{self.proc.returncode} while starting: {one_line(' | '.join(tail))[:400]} (log "
                                f"{self.log})")
            try:
                client.call("/v1/models")
                break
            except (UserError, ServerError):
                pass
            if time.monotonic() - t0 > startup_timeout_s:
                self.stop()
                raise UserError(f"the {what} server did not answer within its startup_timeout_s="
                                f"{startup_timeout_s:g} s (log {self.log})")
            time.sleep(1.0)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        p = getattr(self, "proc", None)
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired, PermissionError):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if getattr(self, "_fh", None) is not None and not self._fh.closed:
            self._fh.close()
