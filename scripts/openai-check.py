#!/usr/bin/env python3
"""The OpenAI front door through the official `openai` SDK (and raw HTTP for
the error paths), against the real binary over HTTP on 127.0.0.1, on an
instruct model (Qwen2.5-Coder-0.5B-Instruct: tool calls need its template).

    openai-check.py ELPIS_SERVER_BINARY MODEL.gguf

Covers: the model list and /health; a whole and a streamed greedy reply
that agree; tool calls required and named, whole and streamed, and a
tool-result turn; a strict json_schema reply; stop, seed and logprobs;
completions of raw text (whole and streamed agree, legacy logprobs);
400s, 401, 404 and 413 with OpenAI's error object; four streams at once;
/metrics through Prometheus' own parser; a client that disconnects,
mid-stream or while waiting for a whole reply, stops its generation. Every reply is greedy or seeded, and every
wait is a hang guard, never a speed assertion.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "openai-check-token-5b1e"
GUARD_S = 300

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
GREEDY = {"temperature": 0, "extra_body": {"emotional_modulation": False}}


def start(binary, model):
    env = dict(os.environ, ELPIS_MODEL_PATH=model, ELPIS_SERVER_HTTP_TOKEN=TOKEN, ELPIS_MODEL_N_THREADS="2",
               ELPIS_SERVER_MAX_LINE_BYTES="65536", ELPIS_SERVER_PROMPT_CACHE_DISK_MIB="0")
    proc = subprocess.Popen([binary, "--http", "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + GUARD_S
    for line in proc.stderr:
        if "(OpenAI API: " in line:
            base = line.split("OpenAI API: ")[1].split(")")[0].strip()
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, base
        assert time.monotonic() < deadline, "the server did not say where it listens"
    raise SystemExit(f"the server exited before listening ({proc.wait()})")


def raw(base, method, path, body=None, token=TOKEN, headers=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base.removesuffix("/v1") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=GUARD_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(base):
    status, text = raw(base, "GET", "/metrics")
    assert status == 200, (status, text)
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def check(name, fn):
    started = time.monotonic()
    fn()
    print(f"ok: {name} ({time.monotonic() - started:.1f} s)", file=sys.stderr)


def main():
    binary, model = sys.argv[1], sys.argv[2]
    proc, base = start(binary, model)
    checks = []
    client = openai.OpenAI(base_url=base, api_key=TOKEN, timeout=GUARD_S, max_retries=0)
    user = lambda text: [{"role": "user", "content": text}]
    try:
        def models():
            listed = client.models.list().data
            assert len(listed) == 1 and listed[0].id, listed
            assert raw(base, "GET", "/health")[0] == 200

        def whole_and_streamed_agree():
            messages = [{"role": "system", "content": "Answer with the number only."}] + user("What is 2 + 2?")
            whole = client.chat.completions.create(model="elpis", messages=messages, max_tokens=8, **GREEDY)
            text = whole.choices[0].message.content
            assert text and whole.choices[0].finish_reason in ("stop", "length"), whole
            assert whole.usage.completion_tokens >= 1 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
            extra = whole.model_extra
            assert "valence" in extra["emotional_state"] and extra["timings"]["reply_tokens"] >= 1, extra
            chunks = list(client.chat.completions.create(model="elpis", messages=messages, max_tokens=8, stream=True,
                                                         stream_options={"include_usage": True}, **GREEDY))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == text, (streamed, text)
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finishes == [whole.choices[0].finish_reason], finishes
            assert chunks[-1].usage and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1]

        def tool_calls():
            ask = user("What is the weather in Paris right now?")
            whole = client.chat.completions.create(model="elpis", messages=ask, tools=[WEATHER, TIME],
                                                   tool_choice="required", **GREEDY)
            choice = whole.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            call = choice.message.tool_calls[0]
            assert call.function.name in ("get_weather", "get_time"), call
            json.loads(call.function.arguments)
            named = {"type": "function", "function": {"name": "get_time"}}
            chunks = list(client.chat.completions.create(model="elpis", messages=user("What time is it in Tokyo?"),
                                                         tools=[WEATHER, TIME], tool_choice=named, stream=True, **GREEDY))
            deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
            assert deltas and deltas[0].function.name == "get_time", chunks
            args = json.loads("".join(d.function.arguments or "" for d in deltas))
            assert "timezone" in args, args
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
            # The call's result goes back, and the model answers in words.
            turn = ask + [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'}]
            answer = client.chat.completions.create(model="elpis", messages=turn, tools=[WEATHER, TIME], max_tokens=40, **GREEDY)
            assert answer.choices[0].message.content, answer

        def json_schema():
            schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                      "required": ["name", "age"], "additionalProperties": False}
            reply = client.chat.completions.create(
                model="elpis", messages=user("Invent a person: give a name and an age."), max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}}, **GREEDY)
            person = json.loads(reply.choices[0].message.content)
            assert set(person) == {"name", "age"} and isinstance(person["age"], int), person

        def stop_seed_logprobs():
            r = client.chat.completions.create(model="elpis", messages=user("List three fruits, one per line."),
                                               max_tokens=40, stop=["\n"], **GREEDY)
            assert "\n" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop", r
            seeded = [client.chat.completions.create(model="elpis", messages=user("Name a colour."), max_tokens=12,
                                                     temperature=0.9, seed=1234, extra_body={"emotional_modulation": False}
                                                     ).choices[0].message.content for _ in range(2)]
            assert seeded[0] == seeded[1], seeded
            lp = client.chat.completions.create(model="elpis", messages=user("Say hello."), max_tokens=5, logprobs=True,
                                                top_logprobs=2, **GREEDY)
            content = lp.choices[0].logprobs.content
            assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), content

        def completions():
            prompt = "def fibonacci(n):\n    "
            whole = client.completions.create(model="elpis", prompt=prompt, max_tokens=16, logprobs=2, **GREEDY)
            choice = whole.choices[0]
            assert choice.text and choice.finish_reason in ("stop", "length") and whole.object == "text_completion", whole
            lp = choice.logprobs
            assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens), lp
            assert all(p <= 0 for p in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs), lp
            assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp
            assert whole.usage.completion_tokens >= 1 and "valence" in whole.model_extra["emotional_state"], whole
            chunks = list(client.completions.create(model="elpis", prompt=prompt, max_tokens=16, stream=True,
                                                    stream_options={"include_usage": True}, **GREEDY))
            streamed = "".join(c.choices[0].text for c in chunks if c.choices)
            assert streamed == choice.text, (streamed, choice.text)
            assert chunks[-1].usage and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1]
            # Raw text, no template: the special tokens written in it are the model's own.
            chat = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
            r = client.completions.create(model="elpis", prompt=chat, max_tokens=40, stop=["!"], **GREEDY)
            assert r.choices[0].finish_reason == "stop" and "<|im_" not in r.choices[0].text, r
            for body, param in [({"model": "elpis"}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"),
                                ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "top_p": 0}, "top_p"),
                                ({"prompt": ""}, "prompt")]:
                status, text = raw(base, "POST", "/v1/completions", body)
                error = json.loads(text)["error"]
                assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", (body, text)

        def errors():
            for kwargs, param in [({"temperature": "hot"}, "temperature"), ({"n": 3}, "n"), ({"max_tokens": 0}, "max_tokens")]:
                try:
                    client.chat.completions.create(model="elpis", messages=user("Hi"), **kwargs)
                    raise AssertionError(f"{kwargs} was accepted")
                except openai.BadRequestError as e:
                    assert e.status_code == 400 and e.body["type"] == "invalid_request_error", e.body
                    assert param in e.body["message"] or e.body.get("param") == param, e.body
            status, body = raw(base, "POST", "/v1/chat/completions", {"model": "elpis"})
            assert status == 400 and json.loads(body)["error"]["param"] == "messages", body
            status, body = raw(base, "POST", "/v1/chat/completions", b"{not json")
            assert status == 400 and "error" in json.loads(body), body
            wrong = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
            try:
                wrong.models.list()
                raise AssertionError("a wrong key was accepted")
            except openai.AuthenticationError as e:
                assert e.status_code == 401
            assert raw(base, "GET", "/v1/nothing")[0] == 404
            big = {"model": "elpis", "messages": [{"role": "user", "content": "a" * 70000}]}
            assert raw(base, "POST", "/v1/chat/completions", big)[0] == 413
            assert raw(base, "GET", "/v1/models", headers={"Origin": "http://evil.example"})[0] == 403

        def four_streams():
            out = [None] * 4

            def one(i):
                chunks = client.chat.completions.create(model="elpis", messages=user(f"Write one sentence about the number {i}."),
                                                        max_tokens=24, stream=True, **GREEDY)
                out[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(GUARD_S)
            assert all(out), out

        def prometheus():
            m = metrics(base)
            for name in ("elpis_prompt_tokens_total", "elpis_tokens_predicted_total", "elpis_prompt_seconds_total",
                         "elpis_tokens_predicted_seconds_total", "elpis_requests_processing", "elpis_requests_deferred",
                         "elpis_kv_cache_tokens", "elpis_prompt_cached_tokens_total"):
                assert name in m, (name, sorted(m))
            assert m["elpis_tokens_predicted_total"] > 0

        def stopped_since(before):
            """The generation a client left ends: nothing processing within
            the guard, and far fewer than its 2000 tokens produced."""
            deadline = time.monotonic() + GUARD_S
            while metrics(base)["elpis_requests_processing"] > 0:
                assert time.monotonic() < deadline, "the generation went on after its client left"
                time.sleep(0.2)
            produced = metrics(base)["elpis_tokens_predicted_total"] - before
            assert produced < 1000, f"{produced} tokens: the generation ran on after the client left"

        def disconnect_stops():
            before = metrics(base)["elpis_tokens_predicted_total"]
            stream = client.chat.completions.create(model="elpis", messages=user("Count from 1 to 2000, separated by commas."),
                                                    max_tokens=2000, stream=True, **GREEDY)
            got = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got += 1
                    if got >= 3:
                        break
            stream.close()
            stopped_since(before)

        def disconnect_stops_a_whole_reply():
            before = metrics(base)["elpis_tokens_predicted_total"]
            impatient = client.with_options(timeout=2.0)
            try:
                impatient.chat.completions.create(model="elpis", messages=user("Count from 1 to 2000, separated by commas."),
                                                  max_tokens=2000, **GREEDY)
                raise AssertionError("2000 tokens came within 2 s")
            except openai.APITimeoutError:
                pass
            stopped_since(before)

        checks = [("models and health", models), ("whole and streamed agree", whole_and_streamed_agree),
                         ("tool calls", tool_calls), ("json_schema", json_schema),
                         ("stop, seed, logprobs", stop_seed_logprobs), ("errors", errors),
                         ("four streams at once", four_streams), ("metrics", prometheus),
                         ("completions of raw text", completions),
                         ("a client that leaves stops its generation", disconnect_stops),
                         ("a client that leaves stops a whole reply", disconnect_stops_a_whole_reply)]
        for name, fn in checks:
            check(name, fn)
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        code = proc.wait(GUARD_S)
        out = proc.stdout.read()
    assert code == 0, f"exit {code}"
    assert out == "", f"the HTTP server wrote to stdout: {out[:200]!r}"
    print(f"openai-check: {len(checks)} passed, 0 failed", file=sys.stderr)


if __name__ == "__main__":
    main()
