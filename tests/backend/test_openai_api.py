"""The OpenAI-compatible API, driven by the real ``openai`` client against a live backend."""

from __future__ import annotations

import openai
import pytest

from tests.backend.conftest import BASE

pytestmark = pytest.mark.slow


@pytest.fixture
def backend(registry, make_backend):
    reg, _ = registry
    return make_backend(reg.url)


def _client(backend) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{backend.url}/v1", api_key="unused", max_retries=0)


def test_completion_with_adapter_and_base(backend, registry):
    _, infos = registry
    client = _client(backend)
    base = client.completions.create(model=BASE, prompt="hello world", max_tokens=8,
                                     temperature=0)
    assert base.model == BASE
    assert base.usage.completion_tokens == 8 and base.usage.prompt_tokens > 0
    tuned = client.completions.create(model="team/a0/1", prompt="hello world", max_tokens=8,
                                      temperature=0)
    assert tuned.model == infos["a0"].ref
    assert tuned.choices[0].finish_reason == "length"
    # The adapter changes what the model says; greedy decoding is repeatable.
    again = client.completions.create(model="team/a0", prompt="hello world", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == tuned.choices[0].text
    assert tuned.choices[0].text != base.choices[0].text


def test_chat_streaming_with_usage(backend):
    client = _client(backend)
    stream = client.chat.completions.create(
        model="team/a1/1", messages=[{"role": "user", "content": "how are you?"}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and
               c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(
        model="team/a1/1", messages=[{"role": "user", "content": "how are you?"}],
        max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == 6


def test_models_lists_base_and_resident(backend):
    client = _client(backend)
    client.completions.create(model="team/a2/1", prompt="hi", max_tokens=1)
    ids = {m.id for m in client.models.list()}
    assert {BASE, "team/a2/1"} <= ids


def test_several_prompts_and_choices(backend):
    client = _client(backend)
    out = client.completions.create(model="team/a0/1", prompt=["hello world", "the fox"],
                                    n=2, max_tokens=4, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]   # greedy: same answer
    assert out.usage.completion_tokens == 16
    stream = client.completions.create(model="team/a0/1", prompt="hello world", n=2,
                                       max_tokens=4, temperature=0, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == texts[1] == by_index[0]
