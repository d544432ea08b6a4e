#!/usr/bin/env python3
"""Drive elpis-server with the official MCP Python SDK, exactly as Psyche's
client does (stdio_client + ClientSession, result.content[0].text parsed with
json.loads), through connect, emotion, generate, a polled stream, a function
call and the resources. Exits non-zero on any mismatch.

Three ways, the same checks:
    psyche-client-check.py BINARY           stdio, as Psyche spawns it
    psyche-client-check.py BINARY --http    the SDK's streamable HTTP client
                                            against `BINARY --http` (with a token)
    psyche-client-check.py BINARY --bridge  stdio to `BINARY --remote URL`, which
                                            relays to `BINARY --http` (Psyche unmodified)

    python3 -m venv /tmp/mcp && /tmp/mcp/bin/pip install mcp
    ELPIS_MODEL_PATH=... /tmp/mcp/bin/python scripts/psyche-client-check.py target/release/elpis-server
"""
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOKEN = "psyche-check-token"


def text_json(result):
    assert len(result.content) == 1, result
    return json.loads(result.content[0].text)


@contextlib.contextmanager
def http_server(binary, env):
    """`binary --http 127.0.0.1:0` with a token; yields its URL (from stderr)."""
    env = dict(env, ELPIS_SERVER_HTTP_TOKEN=TOKEN)
    proc = subprocess.Popen([binary, "--http", "127.0.0.1:0"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            found = re.search(r"serving MCP on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the HTTP server did not say where it listens"
        yield url
        assert proc.poll() is None, "the HTTP server died"
    finally:
        proc.terminate()
        rc = proc.wait(timeout=60)
        stdout = proc.stdout.read()
        assert stdout == "", f"the HTTP server wrote to stdout: {stdout[:200]!r}"
        assert rc == 0, f"the HTTP server exited {rc} on SIGTERM"


@contextlib.asynccontextmanager
async def connect(binary, mode):
    # A fixed seed: every sampled reply is the same on every run.
    env = dict(os.environ, ELPIS_QUIET="1", ELPIS_MODEL_SEED="20261127")
    if mode == "stdio":
        params = StdioServerParameters(command=binary, args=[], env=env)
        async with stdio_client(params) as (read, write):
            yield read, write
        return
    with http_server(binary, env) as url:
        if mode == "http":
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client
            client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
            async with client, streamable_http_client(url, http_client=client) as streams:
                yield streams[0], streams[1]
        else:
            bridge_env = dict(env, ELPIS_SERVER_REMOTE=url, ELPIS_SERVER_HTTP_TOKEN=TOKEN)
            bridge_env.pop("ELPIS_MODEL_PATH", None)  # the bridge loads no model
            params = StdioServerParameters(command=binary, args=[], env=bridge_env)
            async with stdio_client(params) as (read, write):
                yield read, write


async def main(binary, mode):
    async with connect(binary, mode) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            print("protocol", getattr(init, "protocol_version", None) or getattr(init, "protocolVersion", None))
            tools = await session.list_tools()
            names = sorted(t.name for t in tools.tools)
            assert len(names) == 9, names
            caps = text_json(await session.call_tool("get_capabilities", {}))
            assert caps["backend"] == "llama-cpp" and caps["context_length"] > 0, caps
            mood = text_json(await session.call_tool("get_emotion", {}))
            assert "valence" in mood and "trajectory" in mood, mood
            messages = [{"role": "system", "content": "You are Psyche."},
                        {"role": "user", "content": "Reflect briefly."}]
            out = text_json(await session.call_tool(
                "generate", {"messages": messages, "max_tokens": 24, "temperature": 0.7, "emotional_modulation": True}))
            assert "error" not in out and isinstance(out["content"], str), out
            start = text_json(await session.call_tool("generate_stream_start", {"messages": messages, "max_tokens": 24}))
            sid = start["stream_id"]
            text = ""
            while True:
                r = text_json(await session.call_tool("generate_stream_read", {"stream_id": sid}))
                text += r["new_content"]
                if r["is_complete"]:
                    assert r["full_content"] == text, (r, text)
                    break
                await asyncio.sleep(0.05)
            again = await session.call_tool("generate_stream_read", {"stream_id": sid})
            assert "error" in text_json(again), again
            fc = text_json(await session.call_tool("function_call", {
                "messages": [{"role": "user", "content": "Weather in Oslo?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}],
                "tool_choice": "required", "temperature": 0}))
            assert fc["tool_calls"][0]["function"]["name"] == "get_weather", fc
            upd = text_json(await session.call_tool("update_emotion", {"event_type": "success", "intensity": 0.3}))
            assert upd["update_count"] >= 1, upd
            bad = text_json(await session.call_tool("generate", {"messages": []}))
            assert "error" in bad, bad
            res = await session.list_resources()
            assert sorted(str(r.uri) for r in res.resources) == ["elpis://metrics", "emotion://events", "emotion://state"], res
            state = await session.read_resource("emotion://state")
            assert "valence" in json.loads(state.contents[0].text)
            print(f"ok ({mode}): tools, stream, function call, emotion, resources")


if __name__ == "__main__":
    t = time.time()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    mode = "http" if "--http" in sys.argv else "bridge" if "--bridge" in sys.argv else "stdio"
    asyncio.run(main(args[0] if args else "target/release/elpis-server", mode))
    print(f"done in {time.time() - t:.1f} s")
