"""The official `openai` Python client against a real `vlmserve serve` on a loopback port.

Run after `cargo build --release`:
    .venv/bin/python -m pip install -r tests/requirements.txt
    .venv/bin/python -m pytest -q tests/openai_client
The binary is taken from $VLMSERVE_BIN, else target/release/vlmserve (conftest.py).
"""

import base64
import json

import openai
import pytest
from conftest import ROOT, serve

FIXTURE = ROOT / "tests" / "fixtures" / "idefics3-tiny"
MODEL = "idefics3-tiny"


@pytest.fixture(scope="module")
def server():
    with serve({MODEL: FIXTURE / "package"}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reference_case(name):
    cases = json.loads((FIXTURE / "reference.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == name)


def _messages(case):
    content = []
    for image in case["images"]:
        data = base64.b64encode((FIXTURE / image).read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    text = next(p["text"] for p in case["messages"][0]["content"] if p["type"] == "text")
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("name", ["one_image", "two_images"])
def test_chat_completion_matches_reference_tokens(client, name):
    case = _reference_case(name)
    response = client.chat.completions.create(
        model=MODEL,
        messages=_messages(case),
        temperature=0,
        max_tokens=len(case["generated_ids"]),
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == case["generated_ids"]
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(case["input_ids"])
    assert response.usage.completion_tokens == len(case["generated_ids"])


def test_streaming_concatenates_to_the_same_text(client):
    case = _reference_case("two_images")
    whole = client.chat.completions.create(model=MODEL, messages=_messages(case), temperature=0, max_tokens=20)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_messages(case),
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.total_tokens == whole.usage.total_tokens


def test_errors_become_client_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.body["param"] == "n"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
