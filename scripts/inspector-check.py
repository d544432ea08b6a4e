#!/usr/bin/env python3
"""Drive elpis-server with the official MCP Inspector's CLI (an independent
MCP client): list the tools and resources, call every tool and read every
resource, and check what comes back (one JSON text block; structuredContent
equal to it on success; isError with an error on failure). Exits non-zero on
any mismatch.

    scripts/inspector-check.py INSPECTOR_BIN target/release/elpis-server [--http]

With --http the Inspector speaks streamable HTTP to one `elpis-server --http
127.0.0.1:0` (loopback: no token needed), a session per call.
"""
import json
import os
import re
import subprocess
import sys

INSPECTOR, BINARY = sys.argv[1], sys.argv[2]
HTTP = "--http" in sys.argv[3:]
ENV = {"ELPIS_LOGGING_LEVEL": "error", "ELPIS_MODEL_SEED": "20261127", "ELPIS_MODEL_N_THREADS": "2"}
target = [BINARY] + [a for k, v in ENV.items() for a in ("-e", f"{k}={v}")]
server = None
if HTTP:
    # The Inspector ends no session it opens (they idle out after
    # server.http_session_idle_s): room for the check's calls.
    env = dict(os.environ, **ENV, ELPIS_SERVER_MAX_SESSIONS="64")
    server = subprocess.Popen([BINARY, "--http", "127.0.0.1:0"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        found = re.search(r"serving MCP on (http://\S+)", line)
        if found:
            target = [found.group(1), "--transport", "http"]
            break
    assert target[0].startswith("http"), "the HTTP server did not say where it listens"
    # Keep draining its log so it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()


def cli(*args):
    cmd = [INSPECTOR, "--cli", *target, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
    return json.loads(out.stdout)


def call(tool, **arguments):
    args = ["--method", "tools/call", "--tool-name", tool]
    for key, value in arguments.items():
        args += ["--tool-arg", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    result = cli(*args)
    assert len(result["content"]) == 1 and result["content"][0]["type"] == "text", result
    value = json.loads(result["content"][0]["text"])
    if result.get("isError"):
        assert "error" in value, result
    else:
        assert result.get("structuredContent") == value, result
    return value, bool(result.get("isError"))


tools = cli("--method", "tools/list")["tools"]
names = sorted(t["name"] for t in tools)
assert len(names) == 9, names
for t in tools:
    assert t["inputSchema"]["type"] == "object" and t["outputSchema"]["type"] == "object", t
    assert "annotations" in t and "title" in t, t
print("tools/list:", ", ".join(names))

user = [{"role": "user", "content": "Say hello."}]
weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}]
expect_ok = {
    "generate": dict(messages=user, max_tokens=8, temperature=0),
    "generate_stream_start": dict(messages=user, max_tokens=8, temperature=0),
    "function_call": dict(messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=weather,
                          tool_choice="required", temperature=0),
    "update_emotion": dict(event_type="success", intensity=0.5),
    "reset_emotion": {},
    "get_emotion": {},
    "get_capabilities": {},
}
for tool, arguments in expect_ok.items():
    value, is_error = call(tool, **arguments)
    assert not is_error, (tool, value)
    print(f"tools/call {tool}: ok ({', '.join(sorted(value))[:80]})")
assert call("function_call", **expect_ok["function_call"])[0]["tool_calls"][0]["function"]["name"] == "get_weather"
# Each CLI call is a fresh server (stdio) or a fresh session (HTTP): a stream
# id from another call is unknown there.
for tool in ["generate_stream_read", "generate_stream_cancel"]:
    value, is_error = call(tool, stream_id="not-a-stream")
    assert is_error and "unknown stream_id" in value["error"], value
    print(f"tools/call {tool}: error as expected ({value['error'][:50]}...)")
value, is_error = call("generate", messages=[])
assert is_error and "messages" in value["error"], value

resources = cli("--method", "resources/list")["resources"]
assert sorted(r["uri"] for r in resources) == ["elpis://metrics", "emotion://events", "emotion://state"], resources
for r in resources:
    contents = cli("--method", "resources/read", "--uri", r["uri"])["contents"]
    assert contents[0]["mimeType"] == "application/json", contents
    json.loads(contents[0]["text"])
    print(f"resources/read {r['uri']}: ok")
if server is not None:
    server.terminate()
    assert server.wait(timeout=60) == 0, "the HTTP server did not exit 0 on SIGTERM"
    assert server.stdout.read() == "", "the HTTP server wrote to stdout"
print(f"ok: the MCP Inspector listed and called every tool and resource ({'http' if HTTP else 'stdio'})")
