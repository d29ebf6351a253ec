"""Unmodified huggingface_hub downloads versions from a live registry; PEFT loads the result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from tests.registry._util import AUTH, BASE, RegistryProcess, folder_files


@pytest.fixture
def live(tmp_path, tiny_llama, lora_adapter, monkeypatch):
    """A registry process holding two versions of ``acme/sum`` (v1 = prod) and ``plain``."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with RegistryProcess(tmp_path / "data", QUIVER_ANONYMOUS_READ="false") as proc:
        with httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as c:
            config = json.loads((tiny_llama / "config.json").read_text())
            assert c.post("/api/v1/base-models", json={"name": BASE, "config": config}).is_success
            files = {**folder_files(lora_adapter), "docs/notes.md": b"# how this was trained\n"}
            versions = []
            for repo, meta in [("acme/sum", {"aliases": ["prod"]}), ("acme/sum", {}),
                               ("plain", {})]:
                r = c.post(f"/api/v1/repos/{repo}/-/push",
                           data={"metadata": json.dumps({"base_model": BASE, **meta})},
                           files=[("f", (p, d)) for p, d in files.items()])
                assert r.status_code == 201, r.text
                versions.append(r.json())
        yield proc, versions, files


def test_snapshot_download_by_number_alias_revision_and_main(live, tmp_path):
    from huggingface_hub import snapshot_download

    proc, (v1, v2, _), files = live
    for revision, expected in [("1", v1), ("prod", v1), (v1["revision"], v1), ("main", v2),
                               ("2", v2)]:
        folder = snapshot_download("acme/sum", revision=revision, endpoint=proc.url,
                                   token=AUTH["Authorization"].split()[1],
                                   cache_dir=tmp_path / "cache")
        assert folder.endswith(expected["revision"]), (revision, folder)
        assert {p: Path(folder, p).read_bytes() for p in files} == files
    single = snapshot_download("plain", endpoint=proc.url, token=AUTH["Authorization"].split()[1],
                               cache_dir=tmp_path / "cache")
    assert {p: Path(single, p).read_bytes() for p in files} == files


def test_hf_api_views_and_errors(live, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    proc, (v1, v2, _), files = live
    token = AUTH["Authorization"].split()[1]
    api = HfApi(endpoint=proc.url, token=token)
    info = api.model_info("acme/sum", revision="prod")
    assert info.sha == v1["revision"] and info.id == "acme/sum"
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    assert api.model_info("acme/sum").sha == v2["revision"]
    assert sorted(api.list_repo_files("acme/sum", revision="1")) == sorted(files)
    tree = {f.path: f for f in api.list_repo_tree("acme/sum", revision="2", recursive=True)}
    for path, data in files.items():
        assert tree[path].size == len(data)
        assert tree[path].lfs.sha256 == hashlib.sha256(data).hexdigest()
    top = {(f.path, type(f).__name__) for f in api.list_repo_tree("acme/sum", revision="2")}
    assert ("docs", "RepoFolder") in top and ("adapter_config.json", "RepoFile") in top
    assert [f.path for f in api.list_repo_tree("acme/sum", "docs", revision="2")] == [
        "docs/notes.md"]
    refs = api.list_repo_refs("acme/sum")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", v2["revision"])]
    tags = {t.name: t.target_commit for t in refs.tags}
    assert tags == {"1": v1["revision"], "2": v2["revision"], "prod": v1["revision"]}

    path = hf_hub_download("acme/sum", "adapter_config.json", revision="2", endpoint=proc.url,
                           token=token, cache_dir=tmp_path / "c2")
    assert Path(path).read_bytes() == files["adapter_config.json"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/sum", "missing.json", revision="2", endpoint=proc.url, token=token,
                        cache_dir=tmp_path / "c3")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/sum", "adapter_config.json", revision="9", endpoint=proc.url,
                        token=token, cache_dir=tmp_path / "c3")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nothing")
    # Anonymous reads are off on this registry: no token, no download.
    with pytest.raises(Exception) as exc:
        HfApi(endpoint=proc.url, token=False).model_info("acme/sum")
    assert "401" in str(exc.value)

    # Resume: a ranged GET answers 206 with the rest of the file.
    weights = files["adapter_model.safetensors"]
    r = httpx.get(f"{proc.url}/acme/sum/resolve/2/adapter_model.safetensors",
                  headers={**AUTH, "Range": "bytes=16-"})
    assert r.status_code == 206 and r.content == weights[16:]
    assert r.headers["x-repo-commit"] == v2["revision"]
    assert r.headers["x-linked-etag"].strip('"') == hashlib.sha256(weights).hexdigest()


def test_peft_loads_the_downloaded_version(live, tmp_path, tiny_llama, lora_adapter):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc, (v1, _, _), _ = live
    folder = snapshot_download("acme/sum", revision="prod", endpoint=proc.url,
                               token=AUTH["Authorization"].split()[1], cache_dir=tmp_path / "cache")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
        ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder)
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                        lora_adapter)
        got, want = ours(ids).logits, ref(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, plain)       # the adapter really changes the output
