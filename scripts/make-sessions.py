#!/usr/bin/env python3
"""Write the replay sessions of tests/sessions/ (see src/session.rs for the format).

Each session reproduces one pattern of shared/docs/sessions.md with Psyche's
own messages: a long system prompt (persona and tool descriptions, about 1.5k
tokens), the conversation so far, a reflection request. Psyche's waits
(30 s idle, 1 s mood refresh, 50 ms polls) are kept where they shape the
overlap and scaled down where they are only idle time.

Run: python3 scripts/make-sessions.py   (rewrites tests/sessions/*.jsonl)
"""
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "sessions")

PERSONA = """You are Psyche, a thoughtful assistant with a continuous inner life. You remember past \
conversations through a memory system, you notice your own moods, and you think on your own when the \
user is away. You speak plainly and briefly, you admit uncertainty, and you never invent facts about the \
user. When you are idle you reflect on what happened, what you learned and what you might do next.
"""

TOOLS = [
    ("read_file", "Read a text file from the workspace. Arguments: path (string). Returns the content."),
    ("write_file", "Write text to a file in the workspace. Arguments: path (string), content (string)."),
    ("list_directory", "List the entries of a directory. Arguments: path (string)."),
    ("search_memory", "Search long-term memory for related notes. Arguments: query (string), limit (integer)."),
    ("store_memory", "Store a note in long-term memory. Arguments: text (string), tags (list of strings)."),
    ("run_command", "Run a shell command in the sandbox. Arguments: command (string), timeout (seconds)."),
    ("web_search", "Search the web. Arguments: query (string). Returns titles and snippets."),
    ("get_time", "The current date and time. No arguments."),
]


def system_prompt():
    parts = [PERSONA, "\n## Tools\nTo use a tool, write a fenced block tagged tool_call holding "
             '{"name": ..., "arguments": {...}}. You will get the result in the next message.\n']
    for name, description in TOOLS:
        parts.append(f"\n### {name}\n{description}\nUse {name} only when it helps the user or your own "
                     "understanding; explain in one sentence why you call it, and never call it twice "
                     "with the same arguments in one turn. If it fails, say what failed and try another way.\n")
    parts.append("\n## Memory\nRelevant memories are shown below. They may be outdated.\n")
    for i in range(12):
        parts.append(f"- Memory {i + 1}: on day {i + 3} the user talked about their garden, a book on "
                     f"astronomy, and a bug in a parser they are writing; they seemed {['calm', 'tired', 'curious'][i % 3]}.\n")
    parts.append("\n## Emotional state\nYour current mood is shown as valence and arousal; let it colour "
                 "your tone, not your facts.\n")
    return "".join(parts)


SYSTEM = system_prompt()
CONVERSATION = [
    {"role": "user", "content": "Hi Psyche, I spent the morning fixing that parser bug."},
    {"role": "assistant", "content": "Good morning! Was it the off-by-one in the tokenizer you mentioned?"},
    {"role": "user", "content": "Yes, exactly. Now I'm going to make lunch."},
    {"role": "assistant", "content": "Enjoy your lunch. I'll be here."},
]
REFLECT = {"role": "user", "content": "[Idle reflection] Reflect briefly on the recent conversation. "
           "If a tool would help, call it."}


class Session:
    def __init__(self, name):
        self.name = name
        self.steps = []
        self.next_id = 1

    def step(self, after=0.0, **action):
        s = {"after": after} if after else {}
        s.update(action)
        self.steps.append(s)

    def request(self, method, params, after=0.0):
        rid = self.next_id
        self.next_id += 1
        self.step(after, send={"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return rid

    def tool(self, name, args=None, after=0.0, wait=True, progress=None):
        params = {"name": name, "arguments": args or {}}
        if progress:
            params["_meta"] = {"progressToken": progress}
        rid = self.request("tools/call", params, after)
        if wait:
            self.step(wait={"response": rid})
        return rid

    def connect(self):
        self.request("tools/list", {})
        self.step(wait={"response": self.next_id - 1})
        self.tool("get_capabilities")
        self.tool("get_emotion")

    def write(self):
        path = os.path.join(OUT, self.name + ".jsonl")
        with open(path, "w") as f:
            for s in self.steps:
                f.write(json.dumps(s) + "\n")
        return path


def idle_messages(extra=()):
    return [{"role": "system", "content": SYSTEM}] + CONVERSATION + list(extra) + [REFLECT]


def gen_args(messages, max_tokens=512, temperature=0.7):
    return {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "emotional_modulation": True}


def user_turn(text):
    return [{"role": "system", "content": SYSTEM}] + CONVERSATION + [{"role": "user", "content": text}]


def connect_and_idle():
    s = Session("connect-and-idle")
    s.connect()
    s.tool("generate", gen_args(idle_messages(), 512), after=1.0)
    s.tool("update_emotion", {"event_type": "success", "intensity": 0.3, "context": "idle thought finished"})
    s.tool("get_emotion")
    return s


def idle_react():
    s = Session("idle-react")
    s.connect()
    extra = []
    for round_ in range(3):
        s.tool("generate", gen_args(idle_messages(extra), 96), after=0.5)
        extra = extra + [
            {"role": "assistant", "content": f"Let me check my notes.\n```tool_call\n{{\"name\": \"search_memory\", "
                                             f"\"arguments\": {{\"query\": \"parser bug round {round_}\", \"limit\": 3}}}}\n```"},
            {"role": "user", "content": f"[Tool result] search_memory: 3 notes about the parser; the last says "
                                        f"the tokenizer skipped the final character (round {round_})."},
        ]
        s.tool("update_emotion", {"event_type": "insight", "intensity": 0.3})
    s.tool("get_emotion")
    return s


def interrupt_then_stream(with_cancel):
    s = Session("interrupt-then-stream-" + ("cancel" if with_cancel else "abandon"))
    s.connect()
    idle = s.tool("generate", gen_args(idle_messages(), 512), after=0.5, wait=False)
    s.step(after=1.0, background={"every": 1.0, "tool": "get_emotion", "args": {}})
    if with_cancel:
        s.step(after=0.5, cancel=idle)
    start = s.tool("generate_stream_start", gen_args(user_turn("I'm back. What were you thinking about?"), 160),
                   after=0.01, wait=False)
    s.step(poll={"stream_of": start, "every": 0.05})
    s.tool("update_emotion", {"event_type": "user_positive", "intensity": 0.3})
    s.tool("get_emotion")
    return s


def idle_thought_abandoned():
    # Psyche's consumer stops iterating an idle-thought stream (the user
    # typed) without cancelling it; the user's generate must not wait behind
    # it, and after server.stream_idle_s (10 s) it stops, its text readable.
    s = Session("idle-thought-abandoned")
    s.connect()
    thought = s.tool("generate_stream_start", gen_args(idle_messages(), 2000), after=0.5, wait=False)
    s.step(poll={"stream_of": thought, "every": 0.05, "stop_after": 0.5})
    s.tool("generate", gen_args(user_turn("I'm back. Quick question: what did I fix this morning?"), 64), after=0.1)
    s.tool("get_capabilities", after=11.0)
    s.step(poll={"stream_of": thought, "every": 0.05})
    s.tool("get_emotion")
    return s


def stream_timeout_cancel():
    s = Session("stream-timeout-cancel")
    s.connect()
    first = s.tool("generate_stream_start", gen_args(user_turn("Tell me a long story about the sea."), 1000),
                   after=0.2, wait=False)
    s.step(poll={"stream_of": first, "every": 0.05, "cancel_after": 1.5})
    s.tool("update_emotion", {"event_type": "frustration", "intensity": 0.5})
    second = s.tool("generate_stream_start", gen_args(user_turn("Sorry, just a short answer please."), 64), wait=False)
    s.step(poll={"stream_of": second, "every": 0.05})
    return s


def mood_polling():
    s = Session("mood-polling")
    s.connect()
    s.step(background={"every": 1.0, "tool": "get_emotion", "args": {}})
    for i, text in enumerate(["What's a good name for a cat?", "And for a dog?"]):
        start = s.tool("generate_stream_start", gen_args(user_turn(text), 200), after=0.5, wait=False)
        s.step(poll={"stream_of": start, "every": 0.05})
        s.tool("update_emotion", {"event_type": "success" if i == 0 else "user_question", "intensity": 0.3})
    s.step(after=2.0, wait={"response": s.tool("get_emotion", wait=False)})
    return s


def rapid_streams():
    s = Session("rapid-streams")
    s.connect()
    starts = []
    for i in range(10):
        starts.append(s.tool("generate_stream_start",
                             gen_args([{"role": "user", "content": f"Give me fact number {i} about owls."}], 24 + 4 * i),
                             wait=False))
    s.step(poll_all={"streams_of": starts, "every": 0.05, "cancel": [starts[2], starts[5], starts[8]]})
    s.tool("get_emotion")
    return s


def shutdown_mid_stream():
    s = Session("shutdown-mid-stream")
    s.connect()
    start = s.tool("generate_stream_start", gen_args(user_turn("Write a very long essay on rivers."), 2000),
                   after=0.2, wait=False)
    s.step(poll={"stream_of": start, "every": 0.05, "stop_after": 1.5})
    s.step(close=True)
    return s


def shutdown_mid_generate():
    s = Session("shutdown-mid-generate")
    s.connect()
    s.tool("generate", gen_args(idle_messages(), 2000), after=0.2, wait=False)
    s.step(after=1.5, background={"every": 0.5, "tool": "get_emotion", "args": {}})
    s.step(after=1.0, close=True)
    return s


def dreaming():
    s = Session("dreaming")
    s.tool("get_emotion")
    moods = [("blocked", "You feel stuck. Dream about a locked door and what might open it."),
             ("insight", "You feel a spark. Dream about a map that redraws itself."),
             ("idle", "You feel quiet. Dream about a slow river at night.")]
    for event, prompt in moods:
        s.tool("update_emotion", {"event_type": event, "intensity": 1.0})
        s.tool("generate", gen_args([{"role": "system", "content": PERSONA},
                                     {"role": "user", "content": "[Dream] " + prompt}], 256, 0.9), after=0.3)
        s.tool("get_emotion")
    return s


def main():
    os.makedirs(OUT, exist_ok=True)
    sessions = [connect_and_idle(), idle_react(), interrupt_then_stream(True), interrupt_then_stream(False),
                idle_thought_abandoned(), stream_timeout_cancel(), mood_polling(), rapid_streams(), shutdown_mid_stream(),
                shutdown_mid_generate(), dreaming()]
    for s in sessions:
        print(s.write())


if __name__ == "__main__":
    main()
