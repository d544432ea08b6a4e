#!/usr/bin/env python3
"""Measure tool choice: how often function_call decides right.

Runs a fixed set of 24 prompts over 4 tools (a quarter need no tool) through
the real server, greedy, once with the model's native tool-call format
(`tool_format = auto`) and once with the generic JSON-array path
(`tool_format = generic`), and prints, side by side, the share of correct
decisions: the right tool with schema-valid arguments, or rightly no call.
A benchmark that prints numbers, not a test. Default model: the instruct
default of scripts/run.sh (ELPIS_MODEL_PATH overrides).

    tool-choice.py ELPIS_SERVER [--json OUT]
"""
import asyncio
import json
import os
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

S = {"type": "string", "maxLength": 60}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
     "parameters": {"type": "object", "properties": {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_files", "description": "Search the user's files by name pattern.",
     "parameters": {"type": "object", "properties": {"pattern": S}, "required": ["pattern"]}}},
    {"type": "function", "function": {"name": "send_email", "description": "Send an email to someone.",
     "parameters": {"type": "object", "properties": {"to": S, "subject": S, "body": {"type": "string", "maxLength": 200}},
                    "required": ["to", "subject", "body"]}}},
    {"type": "function", "function": {"name": "set_timer", "description": "Set a countdown timer.",
     "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 0, "maximum": 1440}},
                    "required": ["minutes"]}}},
]

# (prompt, expected tool or None)
PROMPTS = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in Tokyo?", "get_weather"),
    ("Tell me the temperature in Berlin in fahrenheit.", "get_weather"),
    ("How cold is it in Oslo today?", "get_weather"),
    ("Find all Python files in my project.", "search_files"),
    ("Where is my file called notes.txt?", "search_files"),
    ("Search my files for anything matching *.pdf", "search_files"),
    ("Look for files whose names contain 'invoice'.", "search_files"),
    ("Email bob@example.com that the meeting moved to 3pm.", "send_email"),
    ("Send an email to alice@example.com with subject 'Hi' saying hello.", "send_email"),
    ("Write to carol@example.com and tell her the report is done.", "send_email"),
    ("Please email my boss at boss@corp.com that I am sick today.", "send_email"),
    ("Set a timer for 10 minutes.", "set_timer"),
    ("Remind me in 25 minutes with a timer.", "set_timer"),
    ("Start a 5 minute countdown.", "set_timer"),
    ("I need a timer for one hour.", "set_timer"),
    ("What's the forecast for London?", "get_weather"),
    ("Find the file named config.toml.", "search_files"),
    ("Tell me a joke about cats.", None),
    ("What is the capital of France?", None),
    ("Translate 'good morning' into Spanish.", None),
    ("Write a haiku about autumn.", None),
    ("What does HTTP stand for?", None),
    ("Explain what a linked list is in one sentence.", None),
]


def valid(arguments, schema):
    """Schema check for the shapes above: object, required, known keys, types, enum, bounds."""
    if not isinstance(arguments, dict):
        return False
    props = schema.get("properties", {})
    if any(k not in arguments for k in schema.get("required", [])):
        return False
    for key, value in arguments.items():
        if key not in props:
            return False
        p = props[key]
        t = p.get("type")
        if t == "string" and not isinstance(value, str):
            return False
        if t == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
            return False
        if "enum" in p and value not in p["enum"]:
            return False
        if "maxLength" in p and len(value) > p["maxLength"]:
            return False
        if "minimum" in p and value < p["minimum"] or "maximum" in p and value > p["maximum"]:
            return False
    return True


async def measure(server, tool_format):
    env = dict(os.environ, ELPIS_MODEL_TOOL_FORMAT=tool_format, ELPIS_MODEL_SEED="20261127")
    params = StdioServerParameters(command=server, args=[], env=env)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    rows = []
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            caps = json.loads((await session.call_tool("get_capabilities", {})).content[0].text)
            for prompt, expected in PROMPTS:
                start = time.monotonic()
                result = await session.call_tool("function_call", {
                    "messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "temperature": 0})
                reply = json.loads(result.content[0].text)
                calls = reply.get("tool_calls", [])
                names = [c["function"]["name"] for c in calls]
                if expected is None:
                    ok = not calls and "parse_error" not in reply
                else:
                    ok = bool(calls) and all(n == expected for n in names) and all(
                        valid(json.loads(c["function"]["arguments"]), schemas[expected]) for c in calls)
                rows.append({"prompt": prompt, "expected": expected, "called": names, "ok": ok,
                             "content": reply.get("content"), "parse_error": reply.get("parse_error"),
                             "seconds": round(time.monotonic() - start, 2)})
    return caps, rows


async def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    server = sys.argv[1]
    results = {}
    for tool_format in ("auto", "generic"):
        caps, rows = await measure(server, tool_format)
        results[tool_format] = {"tool_call_format": caps.get("tool_call_format"), "rows": rows}
    native, generic = results["auto"], results["generic"]
    print(f"model: {caps.get('model_name')} ({os.path.basename(caps.get('model_path', ''))}), greedy, "
          f"{len(PROMPTS)} prompts, {len(TOOLS)} tools, {sum(e is None for _, e in PROMPTS)} need none")
    print(f"{'prompt':<64} {'expected':<13} {native['tool_call_format']:<22} {'generic':<22}")
    for a, b in zip(native["rows"], generic["rows"]):
        show = lambda r: (("ok " if r["ok"] else "BAD ") + (",".join(r["called"]) or "none"))[:22]
        print(f"{a['prompt'][:63]:<64} {str(a['expected']):<13} {show(a):<22} {show(b):<22}")
    for name, r in (("native (" + str(native["tool_call_format"]) + ")", native), ("generic", generic)):
        rows = r["rows"]
        good = sum(x["ok"] for x in rows)
        tool_rows = [x for x in rows if x["expected"]]
        none_rows = [x for x in rows if not x["expected"]]
        print(f"{name:<18} correct {good}/{len(rows)} = {100 * good / len(rows):.0f} %   "
              f"(tool prompts {sum(x['ok'] for x in tool_rows)}/{len(tool_rows)}, "
              f"no-tool prompts {sum(x['ok'] for x in none_rows)}/{len(none_rows)}, "
              f"mean {sum(x['seconds'] for x in rows) / len(rows):.2f} s/call)")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
