"""A small stand-in for a vLLM server on 127.0.0.1, for the faults a real server will not produce on demand.

It answers /v1/models, /tokenize, /detokenize and /v1/completions (prompt log-probs computed from a HF model, in
vLLM's format: {token_id: {logprob, rank}} with the top-K plus the actual token). `mode` injects one fault:
ok, down_then_ok (HTTP 503 for the first `fail_times` requests), slow (sleeps `delay` s), garbage (not JSON),
short (one position missing), positive (a log-prob of +0.5), other_tokenizer (/tokenize answers other ids).
Requests are bounded by the test; the server stops with `close()`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (the timeout tests do so on purpose) is not an error: socketserver would print its
    BrokenPipe traceback to stderr seconds later, into whichever test runs then (seen: a one-line-error check)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeVLLM:
    def __init__(self, model, tokenizer, mode: str = "ok", fail_times: int = 2, delay: float = 2.0):
        self.model, self.tok, self.mode = model.eval(), tokenizer, mode
        self.fail_times, self.delay, self.calls = fail_times, delay, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes | dict) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": "fake", "root": "fake-root", "max_model_len": 512}]})
                self._send(404, {"error": {"message": "no route"}})

            def do_POST(self):  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, body = fake.answer(self.path, req)
                self._send(code, body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, req: dict):
        if path == "/tokenize":
            ids = list(self.tok(req["prompt"], add_special_tokens=False)["input_ids"])
            if self.mode == "other_tokenizer":
                ids = [i + 1 for i in ids]
            return 200, {"tokens": ids, "count": len(ids)}
        if path == "/detokenize":
            return 200, {"prompt": self.tok.decode(req["tokens"])}
        if path != "/v1/completions":
            return 404, {"error": {"message": "no route"}}
        self.calls += 1
        if self.mode == "down_then_ok" and self.calls <= self.fail_times:
            return 503, {"error": {"message": "warming up"}}
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "garbage":
            return 200, b"<html>proxy error</html>"
        k = int(req.get("prompt_logprobs") or 0)
        choices = []
        for i, ids in enumerate(req["prompt"]):
            with torch.no_grad():
                lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
            plp: list = [None]
            for pos in range(1, len(ids)):
                dist = lp[pos - 1]
                order = torch.argsort(dist, descending=True)
                rank = {int(t): r + 1 for r, t in enumerate(order.tolist())}
                entry = {str(int(t)): {"logprob": float(dist[t]), "rank": rank[int(t)]} for t in order[:k].tolist()}
                entry[str(ids[pos])] = {"logprob": float(dist[ids[pos]]), "rank": rank[ids[pos]]}
                if self.mode == "positive":
                    entry[str(ids[pos])]["logprob"] = 0.5
                plp.append(entry)
            if self.mode == "short":
                plp = plp[:-1]
            choices.append({"index": i, "text": "", "prompt_logprobs": plp})
        return 200, {"choices": choices}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
