"""Tool calling: the model asks for a function, we run it, and feed the result back.

Usage: python tool_calling.py BUNDLE
Qwen's chat template describes the tools; the reply's <tool_call>{json}</tool_call> blocks come back parsed in
`result.tool_calls` (invalid JSON is reported in `result.errors`, never raised).
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
for call in result.tool_calls:
    print(f"model called {call.name}({call.arguments})")
    value = get_temperature(**call.arguments)
    chat.add_tool_result(json.dumps({"temperature_c": value}), name=call.name)
if result.tool_calls:
    result = chat.send(None, temperature=0, max_new_tokens=128)  # answer from the tool results
print(result.text or result.errors)
