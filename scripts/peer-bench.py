#!/usr/bin/env python3
"""Elpis against llama-server, side by side on one machine, model and
thread count: the peer a user would pick instead (issue 30).

    scripts/peer-bench.py [--runs 3] [--load 2] [--model PATH]

Builds (once, cached) llama-server natively through scripts/peer.sh, then for
each run starts Elpis (MCP over stdio) and llama-server (HTTP on 127.0.0.1)
one after the other, never both at once (two model servers on one small
machine thrash), alternating which goes first, and measures on each:

- cold prompt: a ~565-token prompt no cache has seen, tokens/s (server's own
  prompt timing);
- decode: 128 greedy tokens, tokens/s (server's own timing);
- four requests at once, 64 tokens each: aggregate tokens/s (client clock,
  first send to last reply) and each one's time to first token (client
  clock, streamed);
- a grown conversation's time to first token (its earlier turns read once
  before; the server's own timing).

Prints medians of the runs and the ratios Elpis / llama-server (above 1 is
better for every ratio: for times it is llama-server's over Elpis's), and
writes the runs as JSON. `--load N` runs N busy processes beside both servers
(the loaded case). `--speculation` measures Elpis alone instead: the same
greedy requests with speculation off and on, for replies that copy their
input and for free chat. Standard library only; not part of CI (a benchmark).
"""

import argparse
import http.client
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("river stone lantern orchard copper meadow harbor violet thunder quiet garden "
         "engine window marble forest signal winter candle silver bridge").split()


def filler(seed, words):
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(words))


def cold_prompt(nonce):
    # About 565 tokens with Qwen's template: a unique first line keeps every
    # cache cold.
    return [{"role": "user", "content": f"Note {nonce}. Summarise these field notes in one line: " + filler(nonce, 520)}]


DECODE = [{"role": "user", "content": "Write a Python module with ten small functions for string handling, each with a docstring."}]

CONCURRENT = [
    "Explain what a hash map is.",
    "Write a haiku about the sea.",
    "List five uses of copper.",
    "Describe a lighthouse at night.",
]


def grown_conversation(nonce):
    turns = []
    for i in range(6):
        turns.append({"role": "user", "content": f"Part {nonce}-{i}: " + filler(nonce * 10 + i, 120)})
        turns.append({"role": "assistant", "content": "Noted: " + filler(nonce * 10 + i + 5, 40)})
    return turns


class Elpis:
    """elpis-server over stdio, MCP by hand (one reader thread)."""

    name = "elpis"

    def __init__(self, binary, model, threads, slots):
        env = dict(os.environ)
        env.update({
            "ELPIS_MODEL_PATH": model,
            "ELPIS_MODEL_N_THREADS": str(threads),
            "ELPIS_MODEL_PARALLEL": str(slots),
            "ELPIS_SERVER_PROMPT_CACHE_DISK_MIB": "0",
            "ELPIS_LOGGING_LEVEL": "WARNING",
        })
        self.proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(os.environ.get("PEER_BENCH_ELPIS_LOG", os.devnull), "w"), env=env, text=True, bufsize=1)
        self.lock = threading.Lock()
        self.next_id = 0
        self.waiting = {}
        threading.Thread(target=self._read, daemon=True).start()
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                    "clientInfo": {"name": "peer-bench", "version": "1"}})
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _send(self, msg):
        with self.lock:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            box = self.waiting.pop(msg.get("id"), None) if "id" in msg and "method" not in msg else None
            if box is not None:
                box.put(msg)

    def request(self, method, params):
        box = queue.Queue()
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            self.waiting[rid] = box
        self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        msg = box.get(timeout=600)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    def call(self, tool, args):
        result = self.request("tools/call", {"name": tool, "arguments": args})
        out = json.loads(result["content"][0]["text"])
        if "error" in out:
            raise RuntimeError(f"{tool}: {out['error']}")
        return out

    def whole(self, messages, max_tokens):
        """(prompt tok/s, decode tok/s, reply tokens, s to the first token) by the server's timings."""
        out = self.call("generate", {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                     "emotional_modulation": False})
        t = out["timings"]
        return t["prompt_tokens_per_s"], t["reply_tokens_per_s"], t["reply_tokens"], t["time_to_first_token_ms"] / 1000

    def stream(self, messages, max_tokens):
        """(seconds to the first text, seconds to the end, reply tokens), client clock."""
        start = time.monotonic()
        sid = self.call("generate_stream_start", {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                                  "emotional_modulation": False})["stream_id"]
        first = None
        while True:
            r = self.call("generate_stream_read", {"stream_id": sid})
            if first is None and r.get("new_content"):
                first = time.monotonic() - start
            if r["is_complete"]:
                end = time.monotonic() - start
                return (first if first is not None else end), end, r["total_tokens"]
            time.sleep(0.01)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


class LlamaServer:
    """llama-server over HTTP on loopback."""

    name = "llama-server"

    def __init__(self, binary, model, threads, slots, ctx):
        self.port = random.randint(20000, 40000)
        self.proc = subprocess.Popen(
            [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(ctx * slots),
             "--host", "127.0.0.1", "--port", str(self.port), "--jinja", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if self._get("/health").get("status") == "ok":
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        raise RuntimeError("llama-server did not start")

    def _get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", path)
        return json.loads(c.getresponse().read())

    def _post(self, body):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        return c.getresponse()

    def whole(self, messages, max_tokens):
        r = json.loads(self._post({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).read())
        t = r["timings"]
        return t["prompt_per_second"], t["predicted_per_second"], t["predicted_n"], t["prompt_ms"] / 1000

    def stream(self, messages, max_tokens):
        start = time.monotonic()
        resp = self._post({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        first, tokens = None, 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.monotonic() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        end = time.monotonic() - start
        return (first if first is not None else end), end, tokens

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def measure(server, nonce):
    row = {}
    row["cold_prompt_tps"] = server.whole(cold_prompt(nonce), 1)[0]
    _, row["decode_tps"], row["decode_tokens"], _ = server.whole(DECODE, 128)
    results = [None] * len(CONCURRENT)

    def one(i):
        results[i] = server.stream([{"role": "user", "content": f"{CONCURRENT[i]} ({nonce})"}], 64)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    row["concurrent_tps"] = sum(r[2] for r in results) / wall
    row["concurrent_ttft_s"] = [round(r[0], 3) for r in results]
    row["concurrent_slowest_ttft_s"] = max(r[0] for r in results)
    row["concurrent_last_done_s"] = max(r[1] for r in results)
    convo = grown_conversation(nonce)
    server.whole(convo + [{"role": "user", "content": "And now?"}], 1)
    grown = convo + [{"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Go on."},
                     {"role": "user", "content": "Summarise part three in a sentence."}]
    # The server's own clock here (a stream polled by MCP and one pushed
    # over SSE would time the protocols, not the cache).
    row["grown_ttft_s"] = server.whole(grown, 1)[3]
    return row


# Speculation (Elpis alone, off against on in one server): replies that
# copy their input, and free chat. None of these were used to tune it.
GROUNDED = [
    "Rename the variable `total` to `running_sum` in this function and give back the whole function, nothing else:\n\n"
    "```python\ndef summarise(orders, tax_rate):\n    total = 0\n    for order in orders:\n        if order.status == 'void':\n"
    "            continue\n        total += order.amount * (1 + tax_rate)\n        if order.discount:\n            total -= order.discount\n"
    "    report = {'count': len(orders), 'total': round(total, 2)}\n    if total > 1000:\n        report['flag'] = 'large'\n"
    "    return report\n```",
    "Add type hints to this function and give back the whole function, nothing else:\n\n"
    "```python\ndef merge_ranges(ranges, gap):\n    ranges = sorted(ranges)\n    merged = []\n    for start, end in ranges:\n"
    "        if merged and start - merged[-1][1] <= gap:\n            merged[-1] = (merged[-1][0], max(merged[-1][1], end))\n"
    "        else:\n            merged.append((start, end))\n    return merged\n```",
    "Change every single quote to a double quote in this code and give back all of it, nothing else:\n\n"
    "```javascript\nfunction label(user) {\n  const parts = [user.first, user.last].filter(Boolean);\n"
    "  if (parts.length === 0) return 'anonymous';\n  const name = parts.join(' ');\n"
    "  return user.admin ? name + ' (admin)' : name;\n}\n```",
]
FREE = ["Tell me a short story about a lighthouse keeper.", "What makes a good code review? Answer in a paragraph."]


def speculation(elpis_bin, model, threads, runs):
    server = Elpis(elpis_bin, model, threads, 1)
    ratios = {"grounded": [], "free": []}
    try:
        for run in range(runs):
            for kind, prompts in (("grounded", GROUNDED), ("free", FREE)):
                for text in prompts:
                    tps, usage = {}, {}
                    for spec in ([False, True] if run % 2 == 0 else [True, False]):
                        out = server.call("generate", {"messages": [{"role": "user", "content": text}], "max_tokens": 300,
                                                       "temperature": 0, "emotional_modulation": False, "speculative": spec})
                        tps[spec], usage[spec] = out["timings"]["reply_tokens_per_s"], out["usage"]
                    ratios[kind].append(tps[True] / tps[False])
                    u = usage[True]
                    print(f"speculation {kind}: off {tps[False]:.1f} on {tps[True]:.1f} tok/s; {u['completion_tokens']} tokens, "
                          f"{u['accepted_tokens']} of {u['draft_tokens']} drafts accepted", file=sys.stderr)
    finally:
        server.close()
    print(f"\nSpeculation on / off, Elpis, {os.path.basename(model)}, medians of {runs} runs of each prompt")
    for kind, values in ratios.items():
        print(f"{kind:<10} {statistics.median(values):.2f}x  (all: {', '.join(f'{v:.2f}' for v in values)})")


def busy():
    while True:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot")
    ap.add_argument("--load", type=int, default=0, help="busy processes beside both servers")
    ap.add_argument("--model", default=os.environ.get("ELPIS_MODEL_PATH"))
    ap.add_argument("--elpis", default=os.path.join(ROOT, "target/release/elpis-server"))
    ap.add_argument("--peer", default=None, help="llama-server binary (default: scripts/peer.sh builds it)")
    ap.add_argument("--out", default="peer-bench.json")
    ap.add_argument("--speculation", action="store_true", help="only Elpis's speculation, off against on")
    a = ap.parse_args()
    model = a.model or subprocess.check_output(["bash", os.path.join(ROOT, "scripts/fetch-model.sh"), "qwen"], text=True).strip()
    if a.speculation:
        return speculation(a.elpis, model, a.threads, a.runs)
    peer = a.peer or subprocess.check_output(["bash", os.path.join(ROOT, "scripts/peer.sh")], text=True).strip()
    # The emotion vectors computed up front (cached), so Elpis serves as a
    # user's second launch does, not its first.
    subprocess.run([a.elpis, "vectors"], env=dict(os.environ, ELPIS_MODEL_PATH=model, ELPIS_MODEL_N_THREADS=str(a.threads)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    load = []
    if a.load:
        import multiprocessing
        load = [multiprocessing.Process(target=busy, daemon=True) for _ in range(a.load)]
        for p in load:
            p.start()
    runs = {"elpis": [], "llama-server": []}
    try:
        for run in range(a.runs):
            order = ["elpis", "llama-server"] if run % 2 == 0 else ["llama-server", "elpis"]
            for name in order:
                server = (Elpis(a.elpis, model, a.threads, a.slots) if name == "elpis"
                          else LlamaServer(peer, model, a.threads, a.slots, a.ctx))
                try:
                    row = measure(server, random.randrange(1 << 30))
                finally:
                    server.close()
                runs[name].append(row)
                print(f"run {run + 1} {name}: " + json.dumps(row), file=sys.stderr)
    finally:
        for p in load:
            p.terminate()
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0] if not isinstance(rows[0][k], list)}
           for name, rows in runs.items()}
    e, p = med["elpis"], med["llama-server"]
    rows = [
        ("cold prompt tok/s", "cold_prompt_tps", False),
        ("decode tok/s", "decode_tps", False),
        ("4 at once, aggregate tok/s", "concurrent_tps", False),
        ("4 at once, slowest first token s", "concurrent_slowest_ttft_s", True),
        ("4 at once, last reply done s", "concurrent_last_done_s", True),
        ("grown conversation, first token s", "grown_ttft_s", True),
    ]
    print(f"\nElpis vs llama-server, {os.path.basename(model)}, {a.threads} threads, {a.slots} slots, "
          f"medians of {a.runs}" + (f", {a.load} busy processes beside" if a.load else ""))
    print(f"{'measure':<36}{'elpis':>10}{'llama-server':>14}{'ratio':>8}")
    for label, key, lower_better in rows:
        ratio = (p[key] / e[key]) if lower_better else (e[key] / p[key])
        print(f"{label:<36}{e[key]:>10.3f}{p[key]:>14.3f}{ratio:>7.2f}x")
    for name in runs:
        print(f"{name} first tokens of the 4 at once, per run: {[r['concurrent_ttft_s'] for r in runs[name]]}")
    with open(a.out, "w") as f:
        json.dump({"runs": runs, "medians": med, "load": a.load, "threads": a.threads, "slots": a.slots}, f, indent=1)


if __name__ == "__main__":
    main()
