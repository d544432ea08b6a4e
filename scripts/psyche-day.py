#!/usr/bin/env python3
"""An hour of Psyche's day, through Psyche's own client library (the MCP
Python SDK: stdio_client + ClientSession, results read as Psyche reads
them), on the default model. Not in CI: the figures go in the closing note.

    psyche-day.py BINARY [--minutes 60] [--out day.json]

What a day holds, in rounds until the time is up:
- idle thoughts: a polled stream Psyche reads every 100 ms, to the end;
- user turns: a conversation that grows, streamed, sometimes interrupted
  (cancelled after a few reads, as a user typing over it);
- mood polls and emotion events between and during everything (the quick
  calls whose latency is measured);
- function calls, now and then;
- a restart in the middle (stdin closed, the server exits, a new one is
  spawned: the prompt cache on disk must serve the known prompts);
- a client that vanishes: a raw client starts a stream and disappears
  without a word; the server it spawned must exit on its own, 0.

Reported (stderr and --out): rounds, errors, the server's RSS each minute,
the p50/p99 of quick calls, and what the cache saved (prompt tokens served
from cache / all prompt tokens), with the memory bound model + KV + the RAM
prompt-cache cap + 64 MiB, and RSS growth over the day's last half hour
(the restart comes a third of the way in, so that half hour is one
server's).
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

PERSONAS = [f"You are Psyche, an agent with memory. Today you are thinking about {topic}. Keep answers short."
            for topic in ("rivers", "old maps", "a garden", "music theory", "the sea", "bread", "clocks", "winter",
                          "mountains", "a library", "trains", "bees")]
THOUGHTS = ["Reflect on what you noticed today.", "What would you like to understand better?",
            "Describe a small thing that went well.", "What is on your mind right now?"]
USER = ["Tell me about it in two sentences.", "Why does that matter?", "Give me one example.",
        "What would you do next?", "Summarise what we said so far."]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}


def text_json(result):
    assert len(result.content) == 1, result
    return json.loads(result.content[0].text)


def children(name="elpis-server"):
    """Pids of this process's children running `name` (the spawned server)."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid == me and comm.startswith(name[:15]):
                    found.append(int(pid))
            except (OSError, ValueError):
                pass
    return found


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


class Day:
    def __init__(self, binary, seconds, seed):
        self.binary, self.until, self.rng = binary, time.monotonic() + seconds, random.Random(seed)
        self.started = time.monotonic()
        self.errors, self.rounds, self.quick_ms = [], 0, []
        self.prompt_tokens = self.cached_tokens = 0
        self.rss = []  # (minute, server index, MiB)
        self.servers = []  # per server: {"rss": [...], "bound_mib": ...}
        self.conversations = {p: [] for p in range(len(PERSONAS))}

    def error(self, what):
        self.errors.append(f"{time.monotonic() - self.started:.0f}s: {what}")
        print("ERROR", what, file=sys.stderr)

    async def quick(self, session, tool, args):
        t = time.monotonic()
        out = text_json(await session.call_tool(tool, args))
        self.quick_ms.append((time.monotonic() - t) * 1000)
        if "error" in out:
            self.error(f"{tool}: {out['error']}")
        return out

    def count(self, out):
        usage = out.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0) + usage.get("cached_tokens", 0)
        self.cached_tokens += usage.get("cached_tokens", 0)

    async def stream(self, session, messages, interrupt):
        start = text_json(await session.call_tool("generate_stream_start", {"messages": messages, "max_tokens": 96}))
        if "error" in start:
            self.error(f"stream start: {start['error']}")
            return ""
        sid, reads, text = start["stream_id"], 0, ""
        while True:
            await asyncio.sleep(0.1)
            if reads % 5 == 2:
                await self.quick(session, "get_emotion", {})
            r = text_json(await session.call_tool("generate_stream_read", {"stream_id": sid}))
            if "error" in r:
                self.error(f"stream read: {r['error']}")
                return text
            reads += 1
            text += r["new_content"]
            if r["is_complete"]:
                if r["full_content"] != text:
                    self.error("a stream's pieces do not add up to its full content")
                self.count(r)
                return text
            if interrupt and reads >= 4:
                out = text_json(await session.call_tool("generate_stream_cancel", {"stream_id": sid}))
                if "error" in out:
                    self.error(f"stream cancel: {out['error']}")
                return text

    async def round(self, session):
        persona = self.rng.randrange(len(PERSONAS))
        system = {"role": "system", "content": PERSONAS[persona]}
        kind = self.rng.random()
        if kind < 0.35:  # an idle thought
            await self.stream(session, [system, {"role": "user", "content": self.rng.choice(THOUGHTS)}], interrupt=False)
        elif kind < 0.8:  # a user turn in a growing conversation
            history = self.conversations[persona]
            history.append({"role": "user", "content": self.rng.choice(USER)})
            reply = await self.stream(session, [system] + history[-12:], interrupt=self.rng.random() < 0.25)
            history.append({"role": "assistant", "content": reply or "..."})
        else:  # a function call
            out = text_json(await session.call_tool("function_call", {
                "messages": [system, {"role": "user", "content": f"What is the weather in {self.rng.choice(['Oslo', 'Lima', 'Pune'])}?"}],
                "tools": [WEATHER], "tool_choice": "auto"}))
            if "error" in out:
                self.error(f"function_call: {out['error']}")
        await self.quick(session, "update_emotion", {"event_type": self.rng.choice(["success", "insight", "failure", "curiosity"]),
                                                    "intensity": round(self.rng.uniform(0.1, 0.8), 2)})
        await self.quick(session, "get_emotion", {})
        self.rounds += 1

    async def serve_until(self, until, index):
        env = dict(os.environ, ELPIS_QUIET="1", ELPIS_MODEL_SEED=str(20261203 + index))
        params = StdioServerParameters(command=self.binary, args=[], env=env)
        record = {"rss": [], "bound_mib": None}
        self.servers.append(record)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                caps = text_json(await session.call_tool("get_capabilities", {}))
                pid = (children(os.path.basename(self.binary)) or [None])[0]
                if pid is None:
                    self.error("cannot find the server's process to sample its RSS")
                next_sample = time.monotonic()
                while time.monotonic() < until:
                    if time.monotonic() >= next_sample and pid:
                        mib = rss_mib(pid)
                        record["rss"].append((round((time.monotonic() - self.started) / 60, 1), mib))
                        print(f"{(time.monotonic() - self.started) / 60:5.1f} min  server {index}  RSS {mib:.0f} MiB  "
                              f"rounds {self.rounds}  errors {len(self.errors)}", file=sys.stderr)
                        next_sample += 60
                    try:
                        await self.round(session)
                    except Exception as e:  # noqa: BLE001 - every failure is counted, the day goes on
                        self.error(f"{type(e).__name__}: {e}")
                metrics = json.loads((await session.read_resource("elpis://metrics")).contents[0].text)
                record["metrics"] = metrics
                record["capabilities"] = {k: caps.get(k) for k in ("model_path", "context_length", "slots", "prompt_cache")}
                record["bound_mib"] = bound_mib(caps, metrics)

    def vanish(self):
        """A raw client that starts a stream and disappears: its server must exit 0 on its own."""
        env = dict(os.environ, ELPIS_QUIET="1")
        proc = subprocess.Popen([self.binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        send = lambda m: (proc.stdin.write((json.dumps(m) + "\n").encode()), proc.stdin.flush())
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                                           "clientInfo": {"name": "vanishing", "version": "1"}}})
        proc.stdout.readline()
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "generate_stream_start", "arguments": {
            "messages": [{"role": "user", "content": "Write a long story about the sea."}], "max_tokens": 2000}}})
        proc.stdout.readline()
        time.sleep(1.0)
        proc.stdin.close()  # gone: no cancel, no goodbye
        proc.stdout.close()
        try:
            code = proc.wait(60)
            if code != 0:
                self.error(f"the vanished client's server exited {code}")
        except subprocess.TimeoutExpired:
            proc.kill()
            self.error("the vanished client's server was still running 60 s later")


def bound_mib(caps, metrics):
    """Model + KV + the RAM prompt-cache cap + 64 MiB, from what the server says."""
    model = caps.get("model_size_bytes") or os.path.getsize(caps["model_path"])
    kv = metrics.get("kv_bytes") or caps.get("kv_bytes") or 0
    cap = (caps.get("prompt_cache") or {}).get("ram_cap_mib") or int(os.environ.get("ELPIS_SERVER_PROMPT_CACHE_RAM_MIB", "512"))
    return round(model / 2**20 + kv / 2**20 + cap + 64, 1)


def growth(series, since):
    """RSS growth from minute `since` of the day to the end, in percent."""
    values = [m for minute, m in series if m and minute >= since]
    if len(values) < 2:
        return None
    return round((values[-1] - values[0]) / values[0] * 100, 2)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="psyche-day.json")
    a = ap.parse_args()
    day = Day(a.binary, a.minutes * 60, a.seed)
    # The restart a third of the way in: the last half hour is one
    # server's, past its first ten minutes.
    await day.serve_until(day.started + a.minutes * 20, 0)  # the morning
    day.vanish()  # a client that disappears, between the two
    await day.serve_until(day.until, 1)  # after the restart
    qs = sorted(day.quick_ms)
    pct = lambda p: round(qs[min(len(qs) - 1, int(p * len(qs)))], 1) if qs else None
    report = {
        "minutes": a.minutes, "rounds": day.rounds, "errors": day.errors,
        "quick_calls": len(qs), "quick_p50_ms": pct(0.5), "quick_p99_ms": pct(0.99),
        "prompt_tokens": day.prompt_tokens, "cached_tokens": day.cached_tokens,
        "cache_saved": round(day.cached_tokens / day.prompt_tokens, 3) if day.prompt_tokens else None,
        "servers": [{"rss_by_minute": s["rss"], "bound_mib": s["bound_mib"], "max_rss_mib": max((m for _, m in s["rss"] if m), default=None),
                     "growth_last_half_hour_pct": growth(s["rss"], a.minutes - 30), "metrics": s.get("metrics")} for s in day.servers],
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "servers"}, indent=1), file=sys.stderr)
    for i, s in enumerate(report["servers"]):
        print(f"server {i}: max RSS {s['max_rss_mib']} MiB (bound {s['bound_mib']}), growth over the last half hour {s['growth_last_half_hour_pct']} %",
              file=sys.stderr)
    sys.exit(1 if day.errors else 0)


if __name__ == "__main__":
    asyncio.run(main())
