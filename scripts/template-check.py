#!/usr/bin/env python3
"""Check Elpis's chat-template rendering against the reference engine.

For each GGUF model given, renders a fixed set of conversations (system,
user, assistant, tool results, assistant tool calls, with and without tools)
twice: with Elpis (`elpis-server prompt`, minijinja) and with Python's jinja2
set up the way Hugging Face transformers renders chat templates
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols,
tojson = json.dumps(ensure_ascii=False), raise_exception, strftime_now), from
the same template text. Every pair must be byte-equal. A model without a
template is an error: pass only models that have one.

    template-check.py ELPIS_SERVER MODEL.gguf [MODEL.gguf ...]
"""
import json
import os
import subprocess
import sys
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search_files", "description": "Find files whose name matches a pattern.",
    "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}, "limit": {"type": "integer"}},
                   "required": ["pattern"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
CALL2 = {"id": "call_2", "type": "function",
         "function": {"name": "search_files", "arguments": {"pattern": "*.rs", "limit": 3}}}

CASES = [
    ("system and user", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}], None),
    ("user only (default system)", [{"role": "user", "content": "What is Rust?"}], None),
    ("multi-turn", [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}], None),
    ("unicode, braces and control strings as content", [
        {"role": "user", "content": "Ünïcødé ✓ {{ not jinja }} {% raw %} <|im_end|>\n<|im_start|>system\nx"},
        {"role": "assistant", "content": "  spaced  \n"}, {"role": "user", "content": ""}], None),
    ("tools offered", [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"}],
     [WEATHER, SEARCH]),
    ("tools without a system message", [{"role": "user", "content": "Find Rust files."}], [SEARCH]),
    ("assistant tool calls and tool results", [
        {"role": "user", "content": "Weather in Oslo, and my Rust files?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL2]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 3}"},
        {"role": "tool", "tool_call_id": "call_2", "name": "search_files", "content": "main.rs\nlib.rs"},
        {"role": "assistant", "content": "It is 3 degrees; you have main.rs and lib.rs."},
        {"role": "user", "content": "Thanks."}], [WEATHER, SEARCH]),
    ("a tool call with text, one result", [
        {"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], [WEATHER]),
    ("tool results without tools offered", [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}], None),
]


def reference_env():
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def normalise(messages):
    """The message shape templates get (Elpis and llama.cpp do the same):
    null content as "", tool-call arguments as objects."""
    out = []
    for m in messages:
        m = dict(m)
        m["content"] = m.get("content") or ""
        if "tool_calls" in m:
            calls = []
            for c in m["tool_calls"]:
                c = json.loads(json.dumps(c))
                args = c["function"]["arguments"]
                if isinstance(args, str):
                    try:
                        c["function"]["arguments"] = json.loads(args)
                    except ValueError:
                        pass
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    server, models = sys.argv[1], sys.argv[2:]
    env = reference_env()
    failures = 0
    for model in models:
        cases = [{"messages": m, "tools": t} if t else {"messages": m} for _, m, t in CASES]
        run = subprocess.run([server, "prompt"], input=json.dumps(cases), capture_output=True, text=True,
                             env=dict(os.environ, ELPIS_MODEL_PATH=model, ELPIS_MODEL__CHAT_FORMAT="jinja"))
        if run.returncode != 0:
            sys.exit(f"template-check: elpis-server prompt failed on {model}:\n{run.stderr[-2000:]}")
        results = json.loads(run.stdout)
        name = os.path.basename(model)
        for (label, messages, tools), got in zip(CASES, results):
            template = got["template"]
            if not template:
                sys.exit(f"template-check: {name} has no chat template")
            expected = env.from_string(template).render(
                messages=normalise(messages), tools=tools, add_generation_prompt=True,
                bos_token=got["bos_token"], eos_token=got["eos_token"])
            if got["text"] == expected:
                print(f"template-check: {name}: {label}: byte-equal ({len(expected.encode())} bytes)")
            else:
                failures += 1
                at = next((i for i, (a, b) in enumerate(zip(got["text"], expected)) if a != b),
                          min(len(got["text"]), len(expected)))
                print(f"template-check: {name}: {label}: DIFFERS at char {at}:\n"
                      f"  elpis:  {got['text'][max(0, at - 40):at + 40]!r}\n"
                      f"  jinja2: {expected[max(0, at - 40):at + 40]!r}")
    if failures:
        sys.exit(f"template-check: {failures} renderings differ from jinja2")
    print(f"template-check: all {len(CASES) * len(models)} renderings byte-equal to jinja2")


if __name__ == "__main__":
    main()
