"""Constrained output through the official client: response_format (a Pydantic model, JSON
object), vLLM's guided_* fields and structured_outputs, on the default model and on every
fixture family; refused constraints are 400s naming their parameter."""

import json
import re
from enum import StrEnum

import openai
import pytest
from conftest import DEFAULT, FAMILIES, circle_messages
from pydantic import BaseModel, Field


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"
    yellow = "yellow"


class Answer(BaseModel):
    colour: Colour
    # Bounded, so that a random-weight model's digits end.
    count: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def client(every_model):
    return every_model


def _messages(question: str = "What color is the circle?"):
    return circle_messages(question)


@pytest.mark.parametrize("model", [DEFAULT, *FAMILIES])
def test_parse_returns_an_object_of_the_pydantic_model(client, model):
    completion = client.chat.completions.parse(
        model=model, messages=_messages(), response_format=Answer, temperature=0, max_tokens=64
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Answer)
    assert Answer.model_validate_json(message.content) == message.parsed
    # The compact form the server writes unless the schema asks otherwise.
    assert message.content.startswith('{"colour": "')


def test_the_default_model_picks_its_own_answer_among_the_choices(client):
    # The model answers " red" (its answers start with a space, as it was trained).
    free = client.chat.completions.create(model=DEFAULT, messages=_messages(), temperature=0, max_tokens=4)
    assert free.choices[0].message.content == " red"
    choices = [" green", " blue", " red", " yellow"]
    completion = client.chat.completions.create(
        model=DEFAULT, messages=_messages(), temperature=0, max_tokens=8, extra_body={"guided_choice": choices}
    )
    assert completion.choices[0].message.content == " red"
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", [DEFAULT, *FAMILIES])
def test_regex_choice_and_grammar_constrain_sampled_output(client, model):
    cases = [
        ({"guided_regex": "[a-z]{2,6}-[0-9]{1,3}"}, re.compile("[a-z]{2,6}-[0-9]{1,3}")),
        ({"guided_choice": ["yes", "no", "maybe so"]}, re.compile("yes|no|maybe so")),
        ({"guided_grammar": 'start: "(" num ("," num)? ")"\nnum: /[0-9]/'}, re.compile(r"\([0-9](,[0-9])?\)")),
        ({"structured_outputs": {"regex": "(up|down)!"}}, re.compile("(up|down)!")),
    ]
    for extra, pattern in cases:
        for seed in range(3):
            completion = client.chat.completions.create(
                model=model,
                messages=_messages(),
                temperature=1.0,
                seed=seed,
                max_tokens=24,
                extra_body=extra,
            )
            # Every pattern here is finite and shorter than max_tokens: it must complete.
            choice = completion.choices[0]
            assert choice.finish_reason == "stop", (extra, choice.message.content)
            assert pattern.fullmatch(choice.message.content), (extra, choice.message.content)


def test_a_schema_given_as_a_string(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    completion = client.chat.completions.create(
        model="idefics3-tiny",
        messages=_messages(),
        temperature=0,
        max_tokens=32,
        extra_body={"guided_json": json.dumps(schema | {"additionalProperties": False})},
    )
    assert json.loads(completion.choices[0].message.content) in ({"ok": True}, {"ok": False})


def test_streamed_constrained_output_concatenates_to_the_whole(client):
    kwargs = {
        "model": DEFAULT,
        "messages": _messages(),
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": Answer.model_json_schema()},
        },
        "temperature": 0,
        "max_tokens": 64,
    }
    whole = client.chat.completions.create(**kwargs)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert text == whole.choices[0].message.content
    Answer.model_validate_json(text)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"yaml": "a: 1"}}, "structured_outputs.yaml"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_refused_constraints_are_400s_naming_their_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT, messages=_messages(), max_tokens=4, extra_body=extra)
    assert bad.value.body["param"] == param, bad.value.body
