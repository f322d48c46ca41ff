"""Chat templates rendered in the sandbox, and parsing of Qwen replies."""

from __future__ import annotations

import json
import re

import pytest

from edgeqwen.errors import BundleError, EdgeQwenError, GenerationError
from edgeqwen.runtime.chat import ChatTemplate, Reply, ToolCall, parse_reply

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# A Qwen2.5-style template: default system prompt, a tools block, tool calls and tool responses.
QWEN25 = r"""
{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
{%- set has_system = messages and messages[0].role == 'system' %}
{%- set system_text = messages[0].content if has_system else default_system %}
{{- '<|im_start|>system\n' + system_text }}
{%- if tools %}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' }}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
    {%- if loop.first and has_system %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'tool' %}
        {%- set previous = messages[loop.index0 - 1] if loop.index0 > 0 else none %}
        {%- if previous is none or previous.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A Qwen3-style template: no default system prompt, past thinking dropped, enable_thinking honoured.
QWEN3 = r"""
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set answer = message.content.split('</think>')[-1].lstrip('\n') %}
        {{- '<|im_start|>assistant\n' + answer + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city (例如 北京)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_qwen25_default_system_and_generation_prompt():
    out = ChatTemplate(QWEN25).render([{"role": "user", "content": "Hi"}])
    assert out == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen25_own_system_and_no_generation_prompt():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    out = ChatTemplate(QWEN25).render(messages, add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_qwen25_tools_tool_calls_and_tool_responses():
    messages = [
        {"role": "user", "content": "Weather in Beijing and Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
                {"name": "get_weather", "arguments": {"city": "Paris"}},
            ],
        },
        {"role": "tool", "content": '{"temp": 31}'},
        {"role": "tool", "content": '{"temp": 18}'},
    ]
    out = ChatTemplate(QWEN25).render(messages, tools=[WEATHER_TOOL])
    tool_json = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert "例如 北京" in tool_json  # tojson keeps non-ASCII as is
    assert out == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_json}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Beijing and Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 31}\n</tool_response>\n'
        '<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "enable_thinking, tail",
    [(None, "<|im_start|>assistant\n"), (True, "<|im_start|>assistant\n"),
     (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n")],
)
def test_qwen3_enable_thinking(enable_thinking, tail):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nsay hello\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
    ]
    out = ChatTemplate(QWEN3).render(messages, enable_thinking=enable_thinking)
    assert out == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n" + tail
    )


def test_special_tokens_extra_variables_and_helpers():
    source = "{{ bos_token }}|{{ eos_token is defined }}|{{ greeting }}|{{ strftime_now('%Y') | length }}"
    assert ChatTemplate(source, bos_token="<s>").render([], greeting="你好") == "<s>|False|你好|4"


def test_tojson_indent():
    out = ChatTemplate("{{ tools[0] | tojson(indent=2) }}").render([], tools=[{"a": "é"}])
    assert out == '{\n  "a": "é"\n}'


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set xs = [] %}{{ xs.append(1) }}",
    ],
)
def test_sandbox_blocks_unsafe_access(source):
    with pytest.raises(BundleError, match="unsafe"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_template_raise_exception_becomes_generation_error():
    source = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('First message must be from the user') }}{% endif %}"
    )
    with pytest.raises(GenerationError, match="First message must be from the user"):
        ChatTemplate(source).render([{"role": "assistant", "content": "x"}])


def test_template_syntax_error_is_a_bundle_error():
    with pytest.raises(BundleError, match="does not parse"):
        ChatTemplate("{% for message in messages %}")


def test_template_missing_variable_use_is_a_generation_error():
    with pytest.raises(GenerationError, match="undefined"):
        ChatTemplate("{{ documents.title }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "messages must be a list"),
        (["hello"], r"messages\[0\] is a str"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"\[1\] has role='bot'"),
        ([{"content": "a"}], r"messages\[0\] has role=None"),
        ([{"role": "user", "content": None}], r"messages\[0\] has content of type NoneType"),
        ([{"role": "user", "content": ["part"]}], r"messages\[0\] has content of type list"),
        ([{"role": "user", "content": "a", "tool_calls": []}], r"messages\[0\] has tool_calls"),
        ([{"role": "assistant", "tool_calls": {"name": "f"}}], r"messages\[0\] has tool_calls of type dict"),
    ],
)
def test_bad_messages_name_the_index_and_problem(messages, match):
    with pytest.raises(GenerationError, match=match):
        ChatTemplate(QWEN25).render(messages)


def test_bad_tools_rejected():
    with pytest.raises(GenerationError, match="tools"):
        ChatTemplate(QWEN25).render([{"role": "user", "content": "x"}], tools=["get_weather"])


def test_assistant_with_tool_calls_needs_no_content():
    text = ChatTemplate(QWEN25).render([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]}])
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
                         '<|im_end|>\n<|im_start|>assistant\n')


# --------------------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------------------

CALL_ID = re.compile(r"^call_[0-9a-f]{8}$")


def test_plain_reply():
    expected = Reply(content="Hello there.", reasoning=None, tool_calls=[], errors=[])
    assert parse_reply("Hello there.") == expected


def test_thinking_and_answer():
    reply = parse_reply("<think>\nThe user greets me.\n</think>\n\nHello!")
    assert (reply.reasoning, reply.content, reply.errors) == ("The user greets me.", "Hello!", [])


def test_thinking_opened_by_the_template():
    reply = parse_reply("Check units first.\n</think>\n\n42 km")
    assert (reply.reasoning, reply.content) == ("Check units first.", "42 km")


def test_unclosed_thinking_is_all_reasoning():
    reply = parse_reply("<think>\nStill thinking when max_tokens hit")
    assert (reply.reasoning, reply.content) == ("Still thinking when max_tokens hit", "")


def test_empty_thinking_block_gives_no_reasoning():
    assert parse_reply("<think>\n\n</think>\n\nHi").reasoning is None


def test_tool_call_with_dict_arguments():
    reply = parse_reply(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    )
    assert reply.content == "Let me check."
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "北京"})]
    assert CALL_ID.match(reply.tool_calls[0].id)
    assert reply.errors == []


def test_tool_call_with_string_arguments():
    body = json.dumps({"name": "add", "arguments": json.dumps({"a": 1, "b": 2})})
    reply = parse_reply(f"<tool_call>\n{body}\n</tool_call>")
    assert reply.tool_calls[0].name == "add" and reply.tool_calls[0].arguments == {"a": 1, "b": 2}
    assert reply.content == ""


def test_two_tool_calls_after_thinking_get_distinct_ids():
    text = (
        "<think>\nI need both cities.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    reply = parse_reply(text)
    assert reply.reasoning == "I need both cities."
    assert [c.name for c in reply.tool_calls] == ["get_weather", "get_time"]
    assert reply.tool_calls[1].arguments == {}
    assert reply.tool_calls[0].id != reply.tool_calls[1].id
    assert all(isinstance(c, ToolCall) and CALL_ID.match(c.id) for c in reply.tool_calls)
    assert reply.content == "" and reply.errors == []


def test_invalid_json_reported_and_kept_in_content():
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'
    good = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    reply = parse_reply(f"Trying.\n{bad}\n{good}")
    assert [c.name for c in reply.tool_calls] == ["get_time"]
    assert len(reply.errors) == 1 and reply.errors[0].startswith("tool call 1 is invalid")
    assert reply.content == f"Trying.\n{bad}"


@pytest.mark.parametrize(
    "body, problem",
    [
        ('{"arguments": {}}', "name"),
        ('["get_time"]', "name"),
        ('{"name": "f", "arguments": [1]}', "arguments"),
        ('{"name": "f", "arguments": "{not json"}', "invalid"),
    ],
)
def test_malformed_tool_calls_never_raise(body, problem):
    reply = parse_reply(f"<tool_call>{body}</tool_call>")
    assert reply.tool_calls == [] and problem in reply.errors[0]
    assert reply.content == f"<tool_call>{body}</tool_call>"


def test_unclosed_tool_call_is_reported():
    text = '<tool_call>\n{"name": "get_weather", "argu'
    reply = parse_reply(text)
    assert reply.tool_calls == [] and "not closed" in reply.errors[0] and reply.content == text


def test_tool_calls_inside_reasoning_are_not_executed():
    reply = parse_reply('<think>maybe <tool_call>{"name": "f", "arguments": {}}</tool_call></think>No.')
    assert reply.tool_calls == [] and reply.content == "No." and "<tool_call>" in reply.reasoning


def test_errors_share_the_sdk_base_class():
    assert issubclass(GenerationError, EdgeQwenError) and issubclass(BundleError, EdgeQwenError)


WEATHER = {"get_weather"}


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
    '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
    '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]',
])
def test_a_reply_that_is_only_a_json_call_to_an_offered_tool_is_a_call(text):
    reply = parse_reply(text, tool_names=WEATHER)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert reply.content == "" and reply.errors == []


@pytest.mark.parametrize(("text", "names"), [
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', set()),  # no tools offered
    ('{"name": "delete_files", "arguments": {}}', WEATHER),  # not an offered tool
    ('Here: {"name": "get_weather", "arguments": {}}', WEATHER),  # prose around it: an answer, not a call
    ('{"name": "get_weather", "arguments": [1]}', WEATHER),  # malformed
    ('{"temperature": 3}', WEATHER),
])
def test_json_that_is_not_a_call_stays_content(text, names):
    reply = parse_reply(text, tool_names=names)
    assert reply.tool_calls == [] and reply.content == text
