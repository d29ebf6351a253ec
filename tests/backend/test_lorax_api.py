"""LoRAX compatibility: the real ``lorax-client`` against a live backend."""

from __future__ import annotations

import httpx
import lorax  # lorax-client: installed with --no-deps by scripts/bootstrap.sh
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def backend(registry, make_backend):
    reg, _ = registry
    return make_backend(reg.url)


def test_generate_and_stream_match(backend):
    client = lorax.Client(backend.url)
    whole = client.generate("hello world", adapter_id="team/a3/1", max_new_tokens=7,
                            details=True)
    assert whole.details.generated_tokens == 7
    assert whole.details.finish_reason.value == "length"
    assert len(whole.details.tokens) == 7
    streamed = list(client.generate_stream("hello world", adapter_id="team/a3/1",
                                           max_new_tokens=7))
    assert len(streamed) == 7
    assert streamed[-1].generated_text == whole.generated_text
    assert "".join(r.token.text for r in streamed) == whole.generated_text
    assert [r.token.id for r in streamed] == [t.id for t in whole.details.tokens]
    # No adapter means the base model, and it answers differently.
    base = client.generate("hello world", max_new_tokens=7)
    assert base.generated_text != whole.generated_text


def test_generate_route_answers_one_object(backend):
    r = httpx.post(f"{backend.url}/generate",
                   json={"inputs": "hello", "parameters": {"adapter_id": "team/a3",
                                                          "max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["generated_text"], str)
    assert r.headers["x-quiver-adapter"] == "team/a3/1"


def test_bad_adapters_fail_with_424_and_others_keep_working(backend):
    client = lorax.Client(backend.url)
    with pytest.raises(lorax.errors.GenerationError, match="does-not-exist"):
        client.generate("hello", adapter_id="team/does-not-exist", max_new_tokens=2)
    with pytest.raises(lorax.errors.GenerationError, match="tiny-other"):
        client.generate("hello", adapter_id="team/other", max_new_tokens=2)
    with pytest.raises(lorax.errors.GenerationError, match="rank"):
        client.generate("hello", adapter_id="team/big", max_new_tokens=2)
    r = httpx.post(f"{backend.url}/generate", json={"inputs": "x", "parameters": {
        "adapter_id": "team/other"}})
    assert r.status_code == 424 and r.json()["code"] == "incompatible_adapter"
    assert r.json()["details"][0]["field"] == "base_model"
    with pytest.raises(lorax.errors.ValidationError):
        client.generate("hello", adapter_id="team/a3", max_new_tokens=100_000)
    r = httpx.post(f"{backend.url}/generate", content=b"{not json")
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = httpx.post(f"{backend.url}/generate", json={"inputs": "x", "parameters": {
        "adapter_id": "team/a3", "adapter_source": "s3"}})
    assert r.status_code == 424 and r.json()["code"] == "unservable_adapter"
    assert client.generate("hello", adapter_id="team/a3", max_new_tokens=2).generated_text
