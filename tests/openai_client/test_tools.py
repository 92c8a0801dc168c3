"""Tool calls through the official client: a forced choice (`required`, a named function) is a
call whose arguments validate against the function's schema, whole and streamed, on the default
model and on every fixture family; tools reach the prompt; calls and results go back in the
conversation; bad tool requests are 400s naming their parameter."""

import json

import openai
import pytest
from conftest import DEFAULT, FAMILIES, circle_messages
from pydantic import BaseModel, Field


class Shape(BaseModel):
    kind: str = Field(pattern="^(circle|square|triangle)$")
    # Bounded, so that a random-weight model's digits end.
    sides: int = Field(ge=0, le=9)


class Zoom(BaseModel):
    factor: int = Field(ge=1, le=4)


TOOLS = [
    openai.pydantic_function_tool(Shape, name="report_shape", description="Report the shape in the picture"),
    openai.pydantic_function_tool(Zoom, name="zoom", description="Zoom into the picture"),
]
SCHEMAS = {"report_shape": Shape, "zoom": Zoom}


@pytest.fixture(scope="module")
def client(every_model):
    return every_model


def _messages(question: str = "What shape is in the picture?"):
    return circle_messages(question)


def _call(client, model, tool_choice, **extra):
    return client.chat.completions.create(
        model=model,
        messages=_messages(),
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=96,
        **extra,
    )


def _validated(call):
    assert call.type == "function" and call.id.startswith("call_")
    return SCHEMAS[call.function.name].model_validate_json(call.function.arguments)


@pytest.mark.parametrize("model", [DEFAULT, *FAMILIES])
def test_required_and_named_choices_return_calls_whose_arguments_validate(client, model):
    required = _call(client, model, "required", parallel_tool_calls=False).choices[0]
    assert required.finish_reason == "tool_calls"
    assert len(required.message.tool_calls) == 1
    _validated(required.message.tool_calls[0])

    # Parallel calls allowed: one or more, each valid (a random-weight model may go on calling
    # until the token limit, which cuts the last call off).
    many = _call(client, model, "required").choices[0]
    assert many.finish_reason in ("tool_calls", "length")
    assert len(many.message.tool_calls) >= 1
    assert all(_validated(call) for call in many.message.tool_calls)

    named = _call(client, model, {"type": "function", "function": {"name": "zoom"}}).choices[0]
    assert named.finish_reason == "tool_calls"
    [call] = named.message.tool_calls
    assert call.function.name == "zoom"
    assert isinstance(_validated(call), Zoom)
    assert named.message.content is None


def test_streamed_calls_concatenate_to_the_same_call(client):
    named = {"type": "function", "function": {"name": "report_shape"}}
    whole = _call(client, DEFAULT, named).choices[0].message.tool_calls[0]
    calls, finish = {}, None
    for chunk in _call(client, DEFAULT, named, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": delta.id})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)


def test_tools_reach_the_prompt_unless_the_choice_is_none(client):
    def prompt_tokens(**extra):
        answer = client.chat.completions.create(
            model=DEFAULT, messages=_messages(), temperature=0, max_tokens=8, **extra
        )
        return answer.usage.prompt_tokens, answer.choices[0].message.content

    bare = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == bare
    offered, _ = prompt_tokens(tools=TOOLS)
    assert offered > bare[0] + 50


def test_a_call_and_its_result_go_back_in_the_conversation(client):
    first = _call(client, DEFAULT, "required", parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    history = _messages() + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})},
    ]
    answer = client.chat.completions.create(model=DEFAULT, messages=history, tools=TOOLS, temperature=0, max_tokens=8)
    longer = client.chat.completions.create(model=DEFAULT, messages=_messages(), tools=TOOLS, max_tokens=1)
    assert answer.usage.prompt_tokens > longer.usage.prompt_tokens + 10


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT, messages=_messages(), max_tokens=2, **extra)
    assert bad.value.body["param"] == param


def test_a_tool_message_without_its_call_id_is_a_400(client):
    messages = _messages() + [{"role": "tool", "content": "42"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT, messages=messages, max_tokens=2)
    assert bad.value.body["param"] == "messages[1].tool_call_id"
