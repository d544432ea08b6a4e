#!/usr/bin/env python3
"""Four greedy replies of one model to one prompt, one per mood quadrant
(the README's sample). Each mood is held by a server whose baseline is that
mood; steering uses the model's cached vectors (`elpis-server vectors`).

    four-moods.py ELPIS_SERVER ["prompt"]
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

MOODS = [("excited", 0.9, 0.5), ("frustrated", -0.9, 0.5), ("calm", 0.9, -0.5), ("depleted", -0.9, -0.5)]


async def reply(server, prompt, valence, arousal, steering):
    env = dict(os.environ, ELPIS_EMOTION_BASELINE_VALENCE=str(valence), ELPIS_EMOTION_BASELINE_AROUSAL=str(arousal),
               ELPIS_EMOTION_STEERING=steering, ELPIS_MODEL_SEED="20261127")
    async with stdio_client(StdioServerParameters(command=server, args=[], env=env)) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            # Steering starts by identifying the model file (a second or so).
            while True:
                caps = json.loads((await session.call_tool("get_capabilities", {})).content[0].text)
                if caps["steering"]["state"] in ("on", "off"):
                    break
                await asyncio.sleep(0.2)
            result = await session.call_tool("generate", {
                "messages": [{"role": "user", "content": prompt}], "max_tokens": 60, "temperature": 0})
            return caps["emotional_steering"], json.loads(result.content[0].text)["content"]


async def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    prompt = sys.argv[2] if len(sys.argv) > 2 else "How is your day going?"
    print(f"prompt: {prompt!r} (greedy, 60 tokens at most)")
    steered, text = await reply(sys.argv[1], prompt, 0.0, 0.0, "off")
    print(f"\n[steering off]\n{text}")
    for name, v, a in MOODS:
        steered, text = await reply(sys.argv[1], prompt, v, a, "auto")
        print(f"\n[{name}: valence {v}, arousal {a}, steering {'on' if steered else 'OFF'}]\n{text}")


if __name__ == "__main__":
    asyncio.run(main())
