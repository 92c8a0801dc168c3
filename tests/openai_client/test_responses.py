"""The Responses API through the official client: an input_image and a question, streamed and
not; refusals of what a stateless server cannot do."""

import base64

import openai
import pytest
from conftest import ROOT, serve

MODEL = "shapes-vlm"
CIRCLE = ROOT / "tests" / "fixtures" / "scenes" / "red-circle.png"


@pytest.fixture(scope="module")
def client():
    with serve({MODEL: ROOT / "models" / MODEL / "package"}) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _input():
    url = "data:image/png;base64," + base64.b64encode(CIRCLE.read_bytes()).decode()
    parts = [
        {"type": "input_image", "image_url": url, "detail": "auto"},
        {"type": "input_text", "text": "What color is the circle?"},
    ]
    return [{"role": "user", "content": parts}]


def test_a_response_answers_about_the_image_as_chat_does(client):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _input()[0]["content"][0]["image_url"]}},
                    {"type": "text", "text": "What color is the circle?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=8,
    )
    response = client.responses.create(model=MODEL, input=_input(), temperature=0, max_output_tokens=8)
    assert response.status == "completed"
    assert response.output_text == chat.choices[0].message.content == " red"
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_events_build_the_same_text(client):
    whole = client.responses.create(model=MODEL, input=_input(), temperature=0, max_output_tokens=3)
    events = list(client.responses.create(model=MODEL, input=_input(), temperature=0, max_output_tokens=3, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.status == whole.status


def test_a_string_input_and_instructions(client):
    response = client.responses.create(
        model=MODEL, input="Say something.", instructions="Be brief.", temperature=0, max_output_tokens=2
    )
    assert response.usage.output_tokens <= 2
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 2
    else:
        assert response.status == "completed" and response.incomplete_details is None
    # The instructions are a system message in the prompt.
    bare = client.responses.create(model=MODEL, input="Say something.", temperature=0, max_output_tokens=2)
    assert response.usage.input_tokens > bare.usage.input_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
    ],
)
def test_what_a_stateless_server_cannot_do_is_a_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=2, extra_body=extra)
    assert bad.value.body["param"] == param
