"""The official `openai` Python client against a real `vlmserve serve` on a loopback port.

Run after `cargo build --release`:
    .venv/bin/python -m pip install -r tests/requirements.txt
    .venv/bin/python -m pytest -q tests/openai_client
The binary is taken from $VLMSERVE_BIN, else target/release/vlmserve (conftest.py).
"""

import base64
import json
import math

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
    # n up to the server's max_batch_size (8 by default).
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=9)
    assert bad.value.body["param"] == "n"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def _logprob_entries(choice_logprobs):
    return [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in choice_logprobs.content]


def test_logprobs_are_sorted_normalised_and_greedy_picks_the_top_one(client):
    case = _reference_case("one_image")
    response = client.chat.completions.create(
        model=MODEL, messages=_messages(case), temperature=0, max_tokens=12, logprobs=True, top_logprobs=5
    )
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens == 12
    for entry in entries:
        top = entry.top_logprobs
        assert len(top) == 5
        assert [a.logprob for a in top] == sorted((a.logprob for a in top), reverse=True)
        assert sum(math.exp(a.logprob) for a in top) <= 1 + 1e-5
        assert (entry.token, entry.logprob) == (top[0].token, top[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    if not any("\ufffd" in e.token for e in entries):
        assert "".join(e.token for e in entries) == choice.message.content


def test_streamed_logprobs_equal_the_whole_ones(client):
    case = _reference_case("two_images")
    kwargs = {"model": MODEL, "messages": _messages(case), "temperature": 0, "max_tokens": 10, "logprobs": True}
    whole = client.chat.completions.create(top_logprobs=3, **kwargs)
    streamed = []
    for chunk in client.chat.completions.create(stream=True, top_logprobs=3, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += _logprob_entries(chunk.choices[0].logprobs)
    assert streamed == _logprob_entries(whole.choices[0].logprobs)
    # Without top_logprobs: the sampled token's alone.
    plain = client.chat.completions.create(**kwargs)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert [e.logprob for e in plain.choices[0].logprobs.content] == [e[1] for e in streamed]


def test_sampled_tokens_logprobs_are_of_the_tempered_distribution(client):
    case = _reference_case("one_image")
    kwargs = {"model": MODEL, "messages": _messages(case), "max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0].logprobs.content[0]
    tempered = client.chat.completions.create(temperature=0.5, seed=3, **kwargs).choices[0].logprobs.content[0]
    # Same first position, same ranking; gaps between log-probabilities grow by 1 / temperature.
    assert [a.token for a in tempered.top_logprobs] == [a.token for a in greedy.top_logprobs]
    for g, t in zip(greedy.top_logprobs[1:], tempered.top_logprobs[1:]):
        gap_greedy = greedy.top_logprobs[0].logprob - g.logprob
        gap_tempered = tempered.top_logprobs[0].logprob - t.logprob
        assert abs(gap_tempered - gap_greedy / 0.5) < 1e-3 * max(1.0, gap_greedy)
    assert tempered.logprob <= 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs")],
)
def test_bad_logprobs_requests_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
        )
    assert bad.value.body["param"] == param


def test_usage_counts_image_tokens_and_hides_cache_hits(client):
    case = _reference_case("two_images")
    image_token = json.loads((FIXTURE / "package" / "config.json").read_text())["image_token_id"]
    for _ in range(2):
        # The second time the image-feature cache has the images; the server does not say so.
        usage = client.chat.completions.create(model=MODEL, messages=_messages(case), temperature=0, max_tokens=2).usage
        assert usage.prompt_tokens_details.image_tokens == case["input_ids"].count(image_token) > 0
        assert usage.prompt_tokens_details.cached_tokens == 0


def _samples(client, n, **extra):
    case = _reference_case("two_images")
    return client.chat.completions.create(
        model=MODEL, messages=_messages(case), n=n, max_tokens=12, extra_body={"return_token_ids": True}, **extra
    )


def test_n_samples_with_a_seed_are_distinct_and_reproducible(client):
    first = _samples(client, 3, temperature=1.0, seed=5)
    again = _samples(client, 3, temperature=1.0, seed=5)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, texts
    # The prompt counts once, every sample's tokens count.
    generated = sum(len(c.model_extra["token_ids"]) for c in first.choices)
    assert first.usage.completion_tokens == generated
    assert first.usage.prompt_tokens == _samples(client, 1, temperature=0).usage.prompt_tokens


def test_greedy_samples_are_equal_to_one_greedy_answer(client):
    one = _samples(client, 1, temperature=0).choices[0].message.content
    assert [c.message.content for c in _samples(client, 2, temperature=0).choices] == [one, one]


def test_streamed_samples_concatenate_per_index_to_the_whole_ones(client):
    whole = _samples(client, 3, temperature=1.0, seed=9)
    case = _reference_case("two_images")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_messages(case),
        n=3,
        max_tokens=12,
        temperature=1.0,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = ["", "", ""], [None, None, None], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
