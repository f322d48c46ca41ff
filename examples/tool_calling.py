"""Tool calling: the model asks for a function, we run it, and feed the result back.

Usage: python tool_calling.py BUNDLE
Qwen's chat template describes the tools; the reply's <tool_call>{json}</tool_call> blocks come back parsed in
`result.tool_calls` (invalid JSON is reported in `result.errors`, never raised; a reply that is only a JSON call
to an offered tool, as small models write it, counts as a call too).
"""
import json
import sys

from edgeqwen import runtime

TOOLS = [{"type": "function", "function": {
    "name": "get_temperature", "description": "Current temperature in a city, in Celsius.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def get_temperature(city: str) -> float:
    return {"oslo": 3.5, "cairo": 31.0}.get(city.lower(), 18.0)


model = runtime.load(sys.argv[1])
chat = model.chat(tools=TOOLS)
result = chat.send("How warm is it in Oslo right now?", temperature=0, max_new_tokens=128)
for _ in range(3):  # a few rounds: with a tool's answer the model may answer, or call again
    if not result.tool_calls:
        break
    for call in result.tool_calls:
        print(f"model called {call.name}({call.arguments})")
        if call.name != "get_temperature" or not isinstance(call.arguments.get("city"), str):
            # a small model can name a tool that does not exist or miss an argument: tell it, do not crash
            chat.add_tool_result(json.dumps({"error": "unknown tool or missing 'city' (a string)"}), name=call.name)
            continue
        value = get_temperature(call.arguments["city"])
        chat.add_tool_result(json.dumps({"temperature_c": value}), name=call.name)
    result = chat.send(None, temperature=0, max_new_tokens=128)  # answer from the tool results
if result.tool_calls:
    print("(the model is still calling tools; small models often repeat a call instead of answering)")
else:
    print(result.text or result.errors)
