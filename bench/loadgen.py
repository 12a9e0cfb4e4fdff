#!/usr/bin/env python3
"""loadgen: N concurrent streaming chat clients over multi-turn conversations against any
OpenAI-compatible server (stpipe serve, llama-server, vLLM), reporting aggregate generated tok/s,
time to first token (TTFT) and inter-token latency (ITL) p50/p99, errors, and TTFT per turn.

Why: issue #17 compares stpipe serve with llama-server as a user sees them (several chats at
once; the 2nd turn of a long chat should reuse the cached prefix). One tool that speaks only the
public API measures every server the same way. Python 3 standard library only; nothing fetched.

    bench/loadgen.py --url http://127.0.0.1:8080 --clients 1,4,8 --turns 3 --max-tokens 128 \\
        --temperature 0.6 --seed 1 --history-tokens 1100 [--json]

For each client count C (one "step"), C threads each run conversations of --turns requests
(`stream: true`, `stream_options.include_usage`); turn t sends the whole history so far plus the
next user message, and appends the streamed answer. Conversations come from OPENERS below (a
fixed set: prose, code, CJK, multi-turn follow-ups). --history-tokens N makes each
conversation's first user message a long document of about N tokens (the history a 2nd turn can
reuse from the server's cache); every conversation starts with its own tag, so no conversation
can reuse another's prefix. Bounds: a step starts at most --requests requests and lasts at most
--duration seconds (requests still streaming then are closed and counted as `cut`, their tokens
so far counted); each read waits at most --timeout seconds.

Counted per step: requests ok / failed (by kind: `http 503`, `http 4xx`..., `connect`,
`timeout`, `broken stream` = ended before `data: [DONE]`, `stream error`, `bad json`) / cut;
generated tokens (the server's `usage.completion_tokens` when it sends it, else the number of
chunks with text: the `tokens from` column says which); aggregate tok/s = tokens / step wall
time; TTFT = request sent to first chunk with text; ITL = gaps between text chunks of one
request; percentiles interpolate linearly between closest ranks (numpy's default).
"""
import argparse
import http.client
import json
import os
import platform
import random
import socket
import sys
import threading
import time
import urllib.parse

# ---- the fixed conversation set ------------------------------------------------------------------
# Each opener is a list of user messages, one per turn (cycled when --turns is larger).
OPENERS = [
    ("prose", ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
               "Continue the story: what does the keeper do the next morning?",
               "Now give the story a title and a one-sentence summary."]),
    ("code", ["Write a Python function that returns the n-th Fibonacci number iteratively, "
              "with a docstring.",
              "Now write unit tests for it with the unittest module.",
              "Rewrite the function in C and explain the overflow limit of uint64_t."]),
    ("cjk", ["请用中文介绍一下长城的历史，大约三段。",
             "长城在明朝有哪些重要的修建工程？",
             "日本語で、万里の長城について短く説明してください。"]),
    ("explain", ["Explain how a hash table handles collisions, with an example.",
                 "What changes when the load factor goes above 0.75?",
                 "Compare open addressing with separate chaining in a table."]),
    ("math", ["A train leaves at 9:40 and travels 210 km at 84 km/h. When does it arrive? "
              "Show the steps.",
              "If it stops for 12 minutes halfway, when does it arrive?",
              "Write the general formula for the arrival time."]),
    ("advice", ["I have a 30-minute window every morning. Plan a week of exercise for a beginner.",
                "Make Wednesday a rest day and move its exercise elsewhere.",
                "Turn the plan into a checklist I can print."]),
    ("code-review", ["Review this C code:\n\nint sum(int *a, int n) {\n  int s;\n"
                     "  for (int i = 0; i <= n; i++) s += a[i];\n  return s;\n}\n",
                     "Fix every bug you found and show the corrected function.",
                     "How would you test it for overflow?"]),
    ("translate", ["Translate into French and German: 'The meeting is moved to Thursday at "
                   "three; please bring the quarterly figures.'",
                   "Now make both translations more formal.",
                   "Which words changed, and why?"]),
]

# Paragraphs the long first message (--history-tokens) is built from, with a rough
# characters-per-token ratio for each (Qwen-style BPE); the real count is the server's
# usage.prompt_tokens, printed per turn, with the tokens the server reused from its cache
# (usage.prompt_tokens_details.cached_tokens, or llama-server's timings.cache_n).
HISTORY_PARAS = [
    (4.2, "The harbour town woke slowly. Fishing boats came in with the tide, gulls circled the "
          "market, and the baker opened his shutters to the smell of bread. Nobody noticed the "
          "stranger who stepped off the morning ferry with a leather case and a folded map, "
          "asking the way to the old observatory on the hill."),
    (4.4, "Distributed systems fail in partial ways: a message is delayed but not lost, a node "
          "answers slowly but is not dead, a clock drifts by a few milliseconds. Designs that "
          "assume clean failures behave badly under these conditions, so timeouts, retries with "
          "backoff and idempotent operations are the usual tools."),
    (3.0, "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
          "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
          "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n"),
    (1.4, "春天来了，山上的花都开了。村子里的人们开始在田里忙碌，孩子们在河边玩耍，"
          "老人们坐在树下聊天。远处传来寺庙的钟声，一切都显得那么平静。"),
    (4.3, "In the quarterly report, revenue grew eight percent while costs rose eleven, mostly "
          "from freight and energy. The board asked for a plan to recover the margin within two "
          "quarters without cutting the research budget or delaying the new warehouse."),
    (3.6, "Recipe: soak 200 g of chickpeas overnight, boil for 90 minutes, then blend with "
          "3 tbsp tahini, the juice of one lemon, a garlic clove, salt and 4 tbsp of the cooking "
          "water until smooth. Serve with olive oil and paprika."),
]


def history_document(n_tokens, rng):
    """About n_tokens tokens of varied text: numbered sections from HISTORY_PARAS in a seeded
    order. Returns (text, estimated tokens)."""
    parts, est, k = [], 0.0, 0
    while est < n_tokens:
        ratio, para = HISTORY_PARAS[rng.randrange(len(HISTORY_PARAS))]
        k += 1
        chunk = f"Section {k}.\n{para}\n"
        parts.append(chunk)
        est += len(chunk) / ratio
    return "".join(parts), int(est)


def conversation(step_clients, conv_index, turns, history_tokens, seed, tag):
    """The user messages of one conversation (one per turn). Deterministic in its arguments."""
    kind, msgs = OPENERS[conv_index % len(OPENERS)]
    users = [msgs[t % len(msgs)] for t in range(turns)]
    head = f"[{tag} c{step_clients} #{conv_index}] "
    if history_tokens > 0:
        rng = random.Random(seed * 1000003 + conv_index)
        doc, _ = history_document(history_tokens, rng)
        users[0] = (head + "Read this document; questions about it may follow.\n\n" + doc +
                    "\nNow the task: " + users[0])
    else:
        users[0] = head + users[0]
    return kind, users


# ---- SSE and statistics (pure; unit-tested on canned input) ----------------------------------------
class SSEParser:
    """Feeds lines of a text/event-stream; returns the `data` payload of each complete event.
    Multi-line data is joined with newlines; comments (`:`) and other fields are ignored."""

    def __init__(self):
        self.data = []

    def feed(self, line):
        line = line.rstrip("\r\n")
        if line == "":
            if not self.data:
                return None
            d, self.data = "\n".join(self.data), []
            return d
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self.data.append(value)
        return None

    def flush(self):
        """The pending event at end of stream (a server may omit the final blank line)."""
        return self.feed("")


def chunk_text(obj):
    """Text of a chat.completion.chunk (content, or reasoning_content some servers split off)."""
    out = ""
    for ch in obj.get("choices") or []:
        delta = ch.get("delta") or {}
        for key in ("content", "reasoning_content"):
            v = delta.get(key)
            if isinstance(v, str):
                out += v
        if isinstance(ch.get("text"), str):  # /v1/completions-style chunk
            out += ch["text"]
    return out


def percentile(values, p):
    """p in [0, 100]; linear interpolation between closest ranks. None for no values."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    x = (len(v) - 1) * p / 100.0
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def summarize(records, clients, wall_s):
    """One step's report from its request records (dicts made by run_request)."""
    ok = [r for r in records if r["status"] == "ok"]
    cut = [r for r in records if r["status"] == "cut"]
    errors = {}
    for r in records:
        if r["status"] == "error":
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    tokens = sum(r["tokens"] for r in ok + cut)
    sources = sorted({r["token_source"] for r in ok + cut if r["tokens"]})
    ttft = [r["ttft"] for r in ok + cut if r["ttft"] is not None]
    itl = [g for r in ok + cut for g in r["gaps"]]
    rates = [(r["n_chunks"] - 1) / (r["t_last"] - r["t_first"]) for r in ok
             if r["n_chunks"] > 1 and r["t_last"] > r["t_first"]]
    turns = {}
    for r in ok + cut:
        turns.setdefault(r["turn"], []).append(r)
    per_turn = []
    for t in sorted(turns):
        rs = turns[t]
        tt = [r["ttft"] for r in rs if r["ttft"] is not None]
        pt = [r["prompt_tokens"] for r in rs if r["prompt_tokens"] is not None]
        ct = [r["cached_tokens"] for r in rs if r["cached_tokens"] is not None]
        per_turn.append({"turn": t, "n": len(rs), "ttft_p50_s": percentile(tt, 50),
                         "ttft_p99_s": percentile(tt, 99),
                         "prompt_tokens_p50": percentile(pt, 50),
                         "cached_tokens_p50": percentile(ct, 50)})
    return {
        "clients": clients,
        "wall_s": wall_s,
        "requests": {"started": len(records), "ok": len(ok), "failed": len(records) - len(ok) -
                     len(cut), "cut": len(cut)},
        "errors": errors,
        "generated_tokens": tokens,
        "tokens_from": "+".join(sources) if sources else "none",
        "tokens_per_second": tokens / wall_s if wall_s > 0 else None,
        "per_request_tokens_per_second_p50": percentile(rates, 50),
        "ttft_s": {"n": len(ttft), "p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "itl_s": {"n": len(itl), "p50": percentile(itl, 50), "p99": percentile(itl, 99)},
        "per_turn": per_turn,
    }


# ---- HTTP --------------------------------------------------------------------------------------
class Target:
    def __init__(self, url, api_key):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad --url {url!r}")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = "Bearer " + api_key

    def connect(self, timeout):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)


def model_id(target, timeout):
    """The first id of GET /v1/models, or None (never raises)."""
    try:
        c = target.connect(timeout)
        c.request("GET", target.base + "/v1/models", headers=target.headers)
        r = c.getresponse()
        body = r.read(1 << 20)
        c.close()
        if r.status != 200:
            return None
        data = json.loads(body).get("data") or []
        return data[0].get("id") if data else None
    except Exception:  # noqa: BLE001 - a report field, never fatal
        return None


def run_request(target, body, timeout, deadline, clock=time.monotonic):
    """One streaming chat request. Returns a record; never raises."""
    rec = {"status": "error", "error": None, "text": "", "tokens": 0, "token_source": "chunks",
           "n_chunks": 0, "ttft": None, "gaps": [], "t_first": None, "t_last": None,
           "prompt_tokens": None, "cached_tokens": None}
    conn = None
    t0 = clock()
    try:
        left = deadline - t0
        if left <= 0:
            rec["status"], rec["error"] = "cut", None
            return rec
        conn = target.connect(min(timeout, left))
        try:
            conn.request("POST", target.base + "/v1/chat/completions", body=json.dumps(body),
                         headers=target.headers)
            sock = conn.sock  # getresponse() drops conn.sock when the server says "close"
            resp = conn.getresponse()
        except (ConnectionError, socket.gaierror, OSError) as e:
            if isinstance(e, socket.timeout):
                raise
            rec["error"] = "connect" if isinstance(e, (ConnectionRefusedError, socket.gaierror)) \
                else "broken stream"
            return rec
        if resp.status != 200:
            try:
                resp.read(1 << 16)
            except Exception:  # noqa: BLE001
                pass
            rec["error"] = f"http {resp.status}"
            return rec
        sse, done, usage, pieces = SSEParser(), False, None, []
        while not done:
            now = clock()
            if now >= deadline:
                rec["status"] = "cut"
                break
            sock.settimeout(min(timeout, deadline - now))
            raw = resp.readline(1 << 20)
            if not raw:
                data = sse.flush()
                if data is None:
                    break
            else:
                data = sse.feed(raw.decode("utf-8", "replace"))
                if data is None:
                    continue
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                rec["error"] = "bad json"
                return rec
            if isinstance(obj, dict) and obj.get("error") is not None:
                rec["error"] = "stream error"
                return rec
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                usage = obj["usage"]
            if isinstance(obj, dict) and isinstance(obj.get("timings"), dict) and \
                    isinstance(obj["timings"].get("cache_n"), int):
                rec["cached_tokens"] = obj["timings"]["cache_n"]  # llama-server's own field
            text = chunk_text(obj) if isinstance(obj, dict) else ""
            if text:
                t = clock()
                if rec["t_first"] is None:
                    rec["t_first"], rec["ttft"] = t, t - t0
                else:
                    rec["gaps"].append(t - rec["t_last"])
                rec["t_last"] = t
                rec["n_chunks"] += 1
                pieces.append(text)
            if not raw:
                break
        rec["text"] = "".join(pieces)
        rec["tokens"] = rec["n_chunks"]
        if usage is not None:
            if isinstance(usage.get("prompt_tokens"), int):
                rec["prompt_tokens"] = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                rec["cached_tokens"] = details["cached_tokens"]
            if done and isinstance(usage.get("completion_tokens"), int):
                rec["tokens"], rec["token_source"] = usage["completion_tokens"], "usage"
        if done:
            rec["status"] = "ok"
        elif rec["status"] != "cut":
            rec["error"] = "broken stream"
        return rec
    except socket.timeout:
        if clock() >= deadline - 0.01:
            rec["status"], rec["error"] = "cut", None
            rec["tokens"] = rec["n_chunks"]
        else:
            rec["error"] = "timeout"
        return rec
    except (http.client.HTTPException, OSError, ValueError):
        rec["error"] = "broken stream"
        return rec
    except Exception as e:  # noqa: BLE001 - counted, never fatal
        rec["error"] = "client: " + type(e).__name__
        return rec
    finally:
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


# ---- one step: C clients -------------------------------------------------------------------------
def run_step(target, args, clients, model, tag):
    records, lock = [], threading.Lock()
    budget = {"left": args.requests}
    start = threading.Barrier(clients + 1)
    t_start = [0.0]

    def take_request():
        with lock:
            if budget["left"] <= 0:
                return False
            budget["left"] -= 1
            return True

    def client(ci):
        start.wait()
        deadline = t_start[0] + args.duration
        for j in range(args.conversations):
            k = ci + j * clients  # conversation index: deterministic, distinct in the step
            kind, users = conversation(clients, k, args.turns, args.history_tokens, args.seed, tag)
            msgs = [{"role": "system", "content": args.system}] if args.system else []
            for t, u in enumerate(users):
                if time.monotonic() >= deadline or not take_request():
                    return
                msgs.append({"role": "user", "content": u})
                body = {"messages": msgs, "stream": True, "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": args.seed + 1000 * k + t,
                        "stream_options": {"include_usage": True}}
                if model:
                    body["model"] = model
                if args.ignore_eos:
                    body["ignore_eos"] = True
                rec = run_request(target, body, args.timeout, deadline)
                rec.update(turn=t + 1, client=ci, conversation=k, kind=kind)
                with lock:
                    records.append(rec)
                if rec["status"] != "ok":
                    break  # a failed conversation is not continued; the next one starts
                msgs.append({"role": "assistant", "content": rec["text"]})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    t_start[0] = time.monotonic()
    start.wait()
    for th in threads:  # bounded: every read ends by the deadline; a little grace for closing
        th.join(max(0.0, t_start[0] + args.duration + 5 - time.monotonic()))
    wall = time.monotonic() - t_start[0]
    with lock:
        recs = list(records)
    for r in recs:
        r.pop("text", None)
    return summarize(recs, clients, wall)


# ---- report --------------------------------------------------------------------------------------
def machine():
    # the first processor's name, family and model (a hypervisor may give Zen 4 and Zen 5 hosts
    # one name; the numbers tell them apart), as stpipe bench prints them
    cpu, fields = platform.processor() or "unknown CPU", {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    if "cpu family" in fields and "model" in fields:
        cpu += " (family %s, model %s)" % (fields["cpu family"], fields["model"])
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": load, "host": platform.node()}


def fmt(x, scale=1.0, digits=2):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_report(rep, out=sys.stdout):
    m, s = rep["machine"], rep["settings"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['loadavg']}")
    p(f"server: {rep['server']['url']}  model: {rep['server']['model']}")
    p("settings: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    p("")
    p("| clients | ok | failed | cut | tokens | tokens from | aggregate tok/s | per-request tok/s "
      "p50 | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | wall s |")
    p("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rep["runs"]:
        q = r["requests"]
        p(f"| {r['clients']} | {q['ok']} | {q['failed']} | {q['cut']} | {r['generated_tokens']} | "
          f"{r['tokens_from']} | {fmt(r['tokens_per_second'])} | "
          f"{fmt(r['per_request_tokens_per_second_p50'])} | {fmt(r['ttft_s']['p50'])} | "
          f"{fmt(r['ttft_s']['p99'])} | {fmt(r['itl_s']['p50'], 1e3, 1)} | "
          f"{fmt(r['itl_s']['p99'], 1e3, 1)} | {fmt(r['wall_s'], 1, 1)} |")
    p("")
    p("| clients | turn | requests | prompt tokens p50 | cached tokens p50 | TTFT p50 s | "
      "TTFT p99 s |")
    p("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rep["runs"]:
        for t in r["per_turn"]:
            p(f"| {r['clients']} | {t['turn']} | {t['n']} | {fmt(t['prompt_tokens_p50'], 1, 0)} | "
              f"{fmt(t['cached_tokens_p50'], 1, 0)} | {fmt(t['ttft_p50_s'])} | "
              f"{fmt(t['ttft_p99_s'])} |")
    errs = [(r["clients"], k, n) for r in rep["runs"] for k, n in sorted(r["errors"].items())]
    if errs:
        p("")
        p("errors: " + "; ".join(f"{c} clients: {k} x{n}" for c, k, n in errs))


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="loadgen.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    ap.add_argument("--clients", default="1,4", help="comma-separated client counts (one step each)")
    ap.add_argument("--turns", type=int, default=2, help="requests per conversation")
    ap.add_argument("--conversations", type=int, default=1,
                    help="conversations per client per step")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=1, help="request seeds and document order")
    ap.add_argument("--history-tokens", type=int, default=0,
                    help="make each first user message a document of about N tokens of the "
                         "Qwen vocabulary (real SmallThinker files; stpipe-genmodel's synthetic "
                         "vocabulary makes ~2.3x as many: see the prompt tokens column)")
    ap.add_argument("--system", default="You are a helpful assistant.",
                    help="system message ('' for none)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send ignore_eos (stpipe, llama-server) so every answer is max-tokens long")
    ap.add_argument("--requests", type=int, default=200, help="at most N requests per step")
    ap.add_argument("--duration", type=float, default=600.0,
                    help="at most S seconds per step (then streams are cut)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="longest wait for one read, s (a queued long prompt can take minutes)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the uncounted 8-token request sent before the first step")
    ap.add_argument("--model", default=None, help="model name to send (default: /v1/models id)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="Bearer key (default $OPENAI_API_KEY)")
    ap.add_argument("--tag", default=None,
                    help="conversation tag (default: from the clock, so a rerun against the same "
                         "server cannot reuse an earlier run's cache)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON only")
    a = ap.parse_args(argv)
    try:
        a.client_counts = [int(x) for x in a.clients.split(",") if x.strip()]
    except ValueError:
        ap.error("--clients takes comma-separated integers")
    if not a.client_counts or min(a.client_counts) < 1 or max(a.client_counts) > 256:
        ap.error("--clients: each count in 1..256")
    for name in ("turns", "conversations", "max_tokens", "requests"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.duration <= 0 or a.timeout <= 0 or a.history_tokens < 0:
        ap.error("--duration and --timeout must be > 0, --history-tokens >= 0")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        target = Target(args.url, args.api_key)
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    served = model_id(target, min(args.timeout, 10.0))
    model = args.model or served
    tag = args.tag or f"run {int(time.time()) % 1000000:06d}"
    if not args.no_warmup:
        run_request(target, {"messages": [{"role": "user", "content": f"[{tag} warm-up] Hi"}],
                             "stream": True, "max_tokens": 8, "temperature": args.temperature,
                             **({"model": model} if model else {})},
                    args.timeout, time.monotonic() + min(args.duration, args.timeout))
    rep = {
        "machine": machine(),
        "server": {"url": args.url, "model": served},
        "settings": {"clients": args.client_counts, "turns": args.turns,
                     "conversations": args.conversations, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "seed": args.seed,
                     "history_tokens": args.history_tokens, "ignore_eos": args.ignore_eos,
                     "requests_cap": args.requests, "duration_cap_s": args.duration,
                     "tag": tag},
        "runs": [],
    }
    for c in args.client_counts:
        rep["runs"].append(run_step(target, args, c, model, tag))
        if not args.json:
            print(f"loadgen: {c} clients done", file=sys.stderr)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    else:
        print_report(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
