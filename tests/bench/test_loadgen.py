#!/usr/bin/env python3
"""test_loadgen: bench/loadgen.py, the load generator for OpenAI-compatible servers.

`unit`: the SSE parser, the percentile and the step summary on canned input; then the whole
tool against a scripted stub server on 127.0.0.1 (answers in a fixed order: 503, a stream
broken before [DONE], an error event, a good stream with usage; then a stream that stalls,
which the --duration bound must cut) and against a closed port: every failure is counted by
kind and the tool never crashes.
`serve`: `stpipe serve --model tiny-qwen-vocab-q4_0-pure.gguf --port 0` (127.0.0.1; the port is
read from its stderr), loadgen with 1 and 2 clients, 2 turns, 8 tokens (ignore_eos): every
request served, tokens exact and equal to the server's /metrics count, TTFT per turn, the 2nd
turn's prompt longer than the 1st; then SIGTERM and exit code 0.
"""
import contextlib
import http.server
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "..", "..", "bench")
sys.path.insert(0, BENCH)
import loadgen as lg  # noqa: E402


def run_tool(argv):
    """loadgen.main in process with --json; returns (exit code, parsed report)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = lg.main(argv + ["--json"])
    return rc, json.loads(out.getvalue())


# ---- unit ------------------------------------------------------------------------------------------
def check_sse():
    p = lg.SSEParser()
    got = []
    canned = ["data: {\"a\":1}\n", "\n", ": keep-alive comment\n", "\n", "event: x\n",
              "data: line1\r\n", "data:line2\n", "\r\n", "id: 7\n", "data: [DONE]\n", "\n"]
    for line in canned:
        d = p.feed(line)
        if d is not None:
            got.append(d)
    assert got == ['{"a":1}', "line1\nline2", "[DONE]"], got
    p.feed("data: tail\n")
    assert p.flush() == "tail"
    assert p.flush() is None
    # chunk text: content, reasoning_content, role-only and usage-only chunks
    assert lg.chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert lg.chunk_text({"choices": [{"delta": {"content": "hé"}}]}) == "hé"
    assert lg.chunk_text({"choices": [{"delta": {"reasoning_content": "r"}}]}) == "r"
    assert lg.chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def check_percentile():
    assert lg.percentile([], 50) is None
    assert lg.percentile([5.0], 99) == 5.0
    v = [4, 1, 3, 2]  # sorted 1 2 3 4: p50 at rank 1.5 -> 2.5; p99 at 2.97 -> 3.97
    assert lg.percentile(v, 50) == 2.5
    assert abs(lg.percentile(v, 99) - 3.97) < 1e-12
    assert lg.percentile(v, 0) == 1 and lg.percentile(v, 100) == 4
    assert abs(lg.percentile(list(range(101)), 99) - 99.0) < 1e-12


def rec(status, turn, tokens=0, ttft=None, gaps=(), t_first=None, t_last=None, error=None,
        source="usage", prompt=None, cached=None):
    return {"status": status, "error": error, "tokens": tokens, "token_source": source,
            "n_chunks": len(gaps) + 1 if ttft is not None else 0, "ttft": ttft, "gaps": list(gaps),
            "t_first": t_first, "t_last": t_last, "prompt_tokens": prompt, "cached_tokens": cached,
            "turn": turn}


def check_summary():
    rs = [rec("ok", 1, 4, 1.0, [0.1, 0.1, 0.2], 1.0, 1.4, prompt=100),
          rec("ok", 2, 4, 0.2, [0.1, 0.3, 0.2], 2.0, 2.6, prompt=140, cached=120),
          rec("cut", 1, 2, 3.0, [0.5], 3.0, 3.5, source="chunks", prompt=None),
          rec("error", 1, error="http 503"), rec("error", 1, error="http 503"),
          rec("error", 2, error="broken stream")]
    s = lg.summarize(rs, 2, 5.0)
    assert s["requests"] == {"started": 6, "ok": 2, "failed": 3, "cut": 1}, s["requests"]
    assert s["errors"] == {"http 503": 2, "broken stream": 1}, s["errors"]
    assert s["generated_tokens"] == 10 and s["tokens_per_second"] == 2.0, s
    assert s["tokens_from"] == "chunks+usage", s["tokens_from"]
    assert s["ttft_s"]["n"] == 3 and s["ttft_s"]["p50"] == 1.0, s["ttft_s"]
    assert s["itl_s"]["n"] == 7 and s["itl_s"]["p50"] == 0.2, s["itl_s"]
    # per-request rate: (chunks - 1) / (last - first) of ok requests: 3/0.4 and 3/0.6
    assert abs(s["per_request_tokens_per_second_p50"] - 6.25) < 1e-9, s
    t1, t2 = s["per_turn"]
    assert (t1["turn"], t1["n"], t1["ttft_p50_s"], t1["prompt_tokens_p50"]) == (1, 2, 2.0, 100)
    assert (t2["turn"], t2["n"], t2["ttft_p50_s"], t2["prompt_tokens_p50"]) == (2, 1, 0.2, 140)
    assert t1["cached_tokens_p50"] is None and t2["cached_tokens_p50"] == 120, (t1, t2)


def check_conversations():
    a = lg.conversation(4, 0, 3, 1100, 1, "t")
    assert a == lg.conversation(4, 0, 3, 1100, 1, "t")  # deterministic
    b = lg.conversation(4, 1, 3, 1100, 1, "t")
    assert a[1][0].split("]")[0] != b[1][0].split("]")[0]  # own tag: no shared prefix
    assert len(a[1]) == 3 and a[1][1] == lg.OPENERS[0][1][1]
    doc, est = lg.history_document(1100, __import__("random").Random(3))
    assert 1100 <= est < 1300 and len(doc) > 2000, (est, len(doc))
    kinds = {k for k, _ in lg.OPENERS}
    assert {"prose", "code", "cjk"} <= kinds


class Stub(http.server.BaseHTTPRequestHandler):
    """Answers chat requests in a fixed order (see the module comment)."""
    protocol_version = "HTTP/1.1"
    script = ["503", "broken", "error-event", "good", "stall"]
    n = 0
    lock = threading.Lock()
    release = threading.Event()

    def log_message(self, *a):
        pass

    def send_sse_head(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

    def ev(self, obj):
        self.wfile.write(("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) +
                          "\n\n").encode())
        self.wfile.flush()

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "stub-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Stub.lock:
            what = Stub.script[min(Stub.n, len(Stub.script) - 1)]
            Stub.n += 1
        chunk = lambda t: {"choices": [{"index": 0, "delta": {"content": t}}]}  # noqa: E731
        if what == "503":
            body = b'{"error":{"message":"busy","code":503}}'
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_sse_head()
        self.ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        if what == "broken":
            self.ev(chunk("a"))
            return  # closes without [DONE]
        if what == "error-event":
            self.ev({"error": {"message": "engine failure"}})
            return
        if what == "good":
            for t in ("Hel", "lo", "!"):
                self.ev(chunk(t))
            self.ev({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            self.ev({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5,
                                              "prompt_tokens_details": {"cached_tokens": 3}}})
            self.ev("[DONE]")
            return
        self.ev(chunk("x"))  # stall: one token, then nothing until released (bounded)
        Stub.release.wait(30)


def check_stub():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        # one client, four one-turn conversations: 503, broken, error event, good
        rc, rep = run_tool(["--url", url, "--clients", "1", "--turns", "1", "--conversations", "4",
                            "--max-tokens", "5", "--no-warmup", "--duration", "30"])
        assert rc == 0
        assert rep["server"]["model"] == "stub-model", rep["server"]
        r = rep["runs"][0]
        assert r["requests"] == {"started": 4, "ok": 1, "failed": 3, "cut": 0}, r["requests"]
        assert r["errors"] == {"http 503": 1, "broken stream": 1, "stream error": 1}, r["errors"]
        assert r["generated_tokens"] == 5 and r["tokens_from"] == "usage", r
        assert r["itl_s"]["n"] == 2 and r["ttft_s"]["n"] == 1, r
        assert r["per_turn"][0]["prompt_tokens_p50"] == 11, r["per_turn"]
        assert r["per_turn"][0]["cached_tokens_p50"] == 3, r["per_turn"]
        # the stalling stream is cut at --duration (1 s), its one token counted; --requests caps
        t0 = time.monotonic()
        rc, rep = run_tool(["--url", url, "--clients", "1", "--turns", "3", "--conversations", "5",
                            "--no-warmup", "--duration", "1", "--requests", "2"])
        took = time.monotonic() - t0
        r = rep["runs"][0]
        assert rc == 0 and took < 10, took
        assert r["requests"] == {"started": 1, "ok": 0, "failed": 0, "cut": 1}, r["requests"]
        assert r["generated_tokens"] == 1 and r["tokens_from"] == "chunks", r
        assert 1.0 <= r["wall_s"] < 6, r["wall_s"]
        # --requests bounds the step: a 503 ends each conversation, so 2 requests, 2 failed
        Stub.n, Stub.script = 0, ["503"]
        rc, rep = run_tool(["--url", url, "--clients", "2", "--turns", "2", "--conversations", "9",
                            "--no-warmup", "--requests", "2"])
        r = rep["runs"][0]
        assert r["requests"]["started"] == 2 and r["errors"] == {"http 503": 2}, r
    finally:
        Stub.release.set()
        srv.shutdown()
        srv.server_close()
    # a closed port: every request is a "connect" error, /v1/models unknown, exit 0
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rc, rep = run_tool(["--url", f"http://127.0.0.1:{port}", "--clients", "1,2", "--turns", "2",
                        "--no-warmup", "--duration", "10"])
    assert rc == 0 and rep["server"]["model"] is None
    assert [r["errors"] for r in rep["runs"]] == [{"connect": 1}, {"connect": 2}], rep["runs"]


# ---- serve -----------------------------------------------------------------------------------------
def start_server():
    bin_dir = os.environ["STP_BIN_DIR"]
    model = os.path.join(os.environ["STP_TEST_DATA"], "tiny-qwen-vocab-q4_0-pure.gguf")
    p = subprocess.Popen([os.path.join(bin_dir, "stpipe"), "serve", "--model", model,
                          "--port", "0", "--threads", "1"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err, deadline, key = b"", time.monotonic() + 60, b"listening on http://127.0.0.1:"
    while key not in err or not err[err.index(key):].count(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stderr], [], [], left)[0]:
            p.kill()
            raise AssertionError(f"stpipe serve did not start: {err!r}")
        b = os.read(p.stderr.fileno(), 4096)
        if not b:
            raise AssertionError(f"stpipe serve exited ({p.wait()}): {err!r}")
        err += b
    port = int(err[err.index(key) + len(key):].split(b"\n")[0].strip())
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(
        p.stderr.fileno(), 4096), b"")], daemon=True)
    drain.start()  # keeps the pipe from filling
    return p, port


def metric(port, name):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def check_serve():
    p, port = start_server()
    try:
        cmd = [sys.executable, os.path.join(BENCH, "loadgen.py"), "--url",
               f"http://127.0.0.1:{port}", "--clients", "1,2", "--turns", "2", "--max-tokens", "8",
               "--ignore-eos", "--history-tokens", "200", "--no-warmup", "--seed", "5",
               "--duration", "120", "--requests", "20", "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        rep = json.loads(out.stdout)
        assert rep["server"]["model"] == "tiny-qwen-vocab-q4_0-pure", rep["server"]
        assert rep["machine"]["cores"] >= 1 and rep["machine"]["cpu"]
        assert [r["clients"] for r in rep["runs"]] == [1, 2]
        total = 0
        for r in rep["runs"]:
            c = r["clients"]
            assert r["requests"] == {"started": 2 * c, "ok": 2 * c, "failed": 0, "cut": 0}, r
            assert r["errors"] == {}, r["errors"]
            assert r["generated_tokens"] == 2 * c * 8 and r["tokens_from"] == "usage", r
            assert r["tokens_per_second"] > 0 and r["ttft_s"]["n"] == 2 * c, r
            assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] < 120, r["ttft_s"]
            assert r["itl_s"]["n"] > 0 and r["itl_s"]["p50"] > 0, r["itl_s"]
            t1, t2 = r["per_turn"]
            assert t1["turn"] == 1 and t2["turn"] == 2 and t1["n"] == t2["n"] == c, r["per_turn"]
            assert t1["ttft_p50_s"] > 0 and t2["ttft_p50_s"] > 0
            # ~200 tokens of document + template; turn 2 adds the answer and the next question
            assert 150 < t1["prompt_tokens_p50"] < 400, t1
            assert t2["prompt_tokens_p50"] > t1["prompt_tokens_p50"] + 8, (t1, t2)
            total += r["generated_tokens"]
        assert metric(port, "stpipe_generated_tokens_total") == total
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
    assert rc == 0, f"stpipe serve exit code {rc}"


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "unit"
    if mode == "unit":
        check_sse()
        check_percentile()
        check_summary()
        check_conversations()
        check_stub()
    elif mode == "serve":
        check_serve()
    else:
        sys.exit(f"usage: {sys.argv[0]} unit|serve")
    print(f"test_loadgen {mode}: ok")


if __name__ == "__main__":
    main()
