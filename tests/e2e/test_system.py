"""The whole system on loopback: registry on PostgreSQL + S3 (moto) + Redis, the router, two
backends serving the demo model and two gateways, each a real process started by
:class:`quiver.client.stack.Stack`.

One stack serves the whole module. The tests run in file order: routing, alias moves,
registry restart, then a backend killed under load (the last, as it leaves one backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis as redis_lib

from quiver.backend.demo import split_prompt
from quiver.client.stack import Stack
from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL

pytestmark = [pytest.mark.slow, pytest.mark.services]

ADMIN = "qv_admin_" + uuid.uuid4().hex
# A Redis database of its own: other suites flush theirs while this one runs.
E2E_REDIS_URL = REDIS_TEST_URL.rsplit("/", 1)[0] + "/13"


def cli(registry_url: str, *args: str) -> dict | list:
    """Run the ``quiver`` CLI with ``--json``; its parsed output (fails on a non-zero exit)."""
    out = subprocess.run([sys.executable, "-m", "quiver.client.cli", "--registry", registry_url,
                          "--token", ADMIN, *args, "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, f"quiver {' '.join(args)}: rc={out.returncode}\n" \
                                f"{out.stdout}\n{out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def system(_pg_admin, s3_server, tmp_path_factory, demo):
    """The running stack plus the demo; yields a dict the tests share."""
    try:
        r = redis_lib.Redis.from_url(E2E_REDIS_URL, socket_connect_timeout=2)
        r.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the service is missing
        from tests.conftest import service_missing

        service_missing("Redis", f"{E2E_REDIS_URL}: {exc}")
    r.flushdb()
    db = f"quiver_e2e_{uuid.uuid4().hex[:10]}"
    _pg_admin.execute(f'CREATE DATABASE "{db}"')
    pg_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
    data = tmp_path_factory.mktemp("e2e")
    common = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "QUIVER_REDIS_URL": E2E_REDIS_URL,
              "QUIVER_LOG_LEVEL": "INFO"}
    stack = Stack(data, env=common, inherit_quiver_env=False, stop_timeout=10)
    try:
        registry = stack.start("registry", ["registry", "--data-dir", str(data / "registry")],
                               ready_path="/api/v1/health", env={
                                   "QUIVER_DATABASE_URL": pg_url, "QUIVER_BLOB_STORE": "s3",
                                   "QUIVER_S3_ENDPOINT": s3_server["endpoint"],
                                   "QUIVER_S3_ACCESS_KEY": s3_server["access_key"],
                                   "QUIVER_S3_SECRET_KEY": s3_server["secret_key"],
                                   "QUIVER_S3_BUCKET": f"quiver-e2e-{uuid.uuid4().hex[:8]}",
                                   "QUIVER_ADMIN_TOKEN": ADMIN})
        reg = registry.url
        for name in ("backend-a", "backend-b"):
            stack.start(name, ["backend", "--model", str(demo.base_dir), "--registry", reg,
                               "--base-model-name", demo.base_model],
                        ready_path="/ready", timeout=300, wait=False,
                        env={"QUIVER_BACKEND_ID": name, "QUIVER_DEVICE": "cpu",
                             "QUIVER_DISK_CACHE_DIR": str(data / name / "cache"),
                             "QUIVER_DRAIN_TIMEOUT": "2"})
        stack.start("router", ["router", "--registry", reg], ready_path="/health", timeout=300,
                    wait=False, env={"QUIVER_ARTIFACT_DIR": str(data / "router"),
                                     "QUIVER_DEFAULT_BASE_MODEL": demo.base_model})

        cli(reg, "base", "add", str(demo.base_dir / "config.json"), "--name", demo.base_model)
        pushed = {}
        for adapter in demo.adapters:
            examples = data / f"{adapter.name}.txt"
            examples.write_text("\n".join(adapter.examples) + "\n")
            info = cli(reg, "push", str(adapter.dir), adapter.repo, "--base-model",
                       demo.base_model, "--examples", str(examples), "--task-description",
                       adapter.task_description, "--alias", "prod", "--no-progress")
            pushed[adapter.repo] = info

        for name in ("router", "backend-a", "backend-b"):
            stack.wait_ready(name, timeout=300)
        httpx.post(stack.url("router") + "/v1/routers/refresh", timeout=300).raise_for_status()
        stack.wait_ready("router", timeout=120, path="/ready")
        for name in ("gateway-1", "gateway-2"):
            stack.start(name, ["gateway", "--registry", reg, "--router", stack.url("router")],
                        ready_path="/ready", timeout=120,
                        env={"QUIVER_DRAIN_TIMEOUT_S": "2"})
        yield {"stack": stack, "demo": demo, "pushed": pushed, "registry": reg, "data": data}
    finally:
        stack.stop_all()
        _pg_admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        r.flushdb()
        r.close()


def _openai(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="e2e", timeout=120, max_retries=0)


def complete(gateway_url: str, model: str, prompt: str) -> tuple[str, dict]:
    """(answer, response headers) for one non-streamed completion through a gateway."""
    from quiver.backend.demo import render_prompt

    raw = _openai(gateway_url).completions.with_raw_response.create(
        model=model, prompt=render_prompt(prompt), max_tokens=48, temperature=0.0)
    return raw.parse().choices[0].text.strip(), dict(raw.headers)


def _repo_of(adapter_header: str) -> str:
    """``demo/shout/1`` or ``demo/shout@prod`` → ``demo/shout``."""
    head = adapter_header.split("@", 1)[0]
    parts = head.split("/")
    return "/".join(parts[:2])


def test_auto_requests_reach_the_adapter_that_answers(system):
    stack, demo = system["stack"], system["demo"]
    checked = wrong = 0
    for gateway in ("gateway-1", "gateway-2"):
        url = stack.url(gateway)
        for adapter in demo.adapters:
            for prompt, expected in adapter.test_pairs[:3]:
                answer, headers = complete(url, "auto", prompt)
                assert _repo_of(headers.get("x-quiver-adapter", "")) == adapter.repo, \
                    (prompt, headers.get("x-quiver-adapter"))
                assert headers.get("x-quiver-backend") in ("backend-a", "backend-b")
                # The same prompt sent to that adapter by name gives the same (greedy) answer.
                direct, _ = complete(url, f"{adapter.repo}@prod", prompt)
                assert answer == direct, (prompt, answer, direct)
                checked += 1
                wrong += answer != expected
    # The demo adapters are trained to this: answers are the task's exact output.
    assert wrong <= checked // 6, f"{wrong} of {checked} answers differ from the expected ones"


def test_openai_chat_and_streams_through_the_gateway_to_real_backends(system):
    from quiver.backend.demo import render_prompt

    stack, demo = system["stack"], system["demo"]
    client = _openai(stack.url("gateway-2"))
    adapter = demo.adapters[0]
    prompt, expected = adapter.test_pairs[0]
    model = f"{adapter.repo}@prod"

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=48,
        temperature=0.0)
    assert chat.choices[0].message.content.strip() == expected
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0

    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=48,
        temperature=0.0, stream=True) if c.choices]
    assert "".join(pieces).strip() == expected and len(pieces) > 1

    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt=render_prompt(prompt), max_tokens=48, temperature=0.0,
        stream=True) if c.choices]
    assert "".join(pieces).strip() == expected


def test_base_model_prompt_is_not_sent_to_an_adapter(system):
    stack, demo = system["stack"], system["demo"]
    prompt, expected = next(((p, a) for p, a in demo.base_test_pairs
                             if p.lower().startswith("tell me")), demo.base_test_pairs[-1])
    answer, headers = complete(stack.url("gateway-1"), "auto", prompt)
    base_answer, _ = complete(stack.url("gateway-1"), demo.base_model, prompt)
    assert headers.get("x-quiver-adapter", "") == "", headers.get("x-quiver-adapter")
    assert answer == base_answer == expected


def test_new_version_and_moved_prod_alias_are_followed_without_restarts(system):
    stack, demo, reg = system["stack"], system["demo"], system["registry"]
    shout, reverse = demo.adapter("shout"), demo.adapter("reverse")
    prompt = shout.test_pairs[0][0]
    url = stack.url("gateway-2")
    before, _ = complete(url, f"{shout.repo}@prod", prompt)
    via_reverse, _ = complete(url, f"{reverse.repo}@prod", prompt)
    payload = split_prompt(prompt)[1]
    assert (before, via_reverse) == (payload.upper(), payload[::-1])

    info = cli(reg, "push", str(reverse.dir), shout.repo, "--base-model", demo.base_model,
               "--description", "reverse weights as shout v2", "--no-progress")
    assert info["version"] == 2
    # Until the alias moves, prod still answers with version 1.
    assert complete(url, f"{shout.repo}@prod", prompt)[0] == before
    cli(reg, "alias", "set", shout.repo, "prod", "2")
    starts = {n: c.restarts for n, c in stack.components.items()}
    try:
        deadline = time.monotonic() + 30
        while True:
            answers = {g: complete(stack.url(g), f"{shout.repo}@prod", prompt)
                       for g in ("gateway-1", "gateway-2")}
            if all(a == via_reverse for a, _ in answers.values()):
                break
            assert time.monotonic() < deadline, f"prod did not follow: {answers}"
            time.sleep(0.5)
        for _, headers in answers.values():
            assert headers.get("x-quiver-adapter", "").startswith(shout.repo)
    finally:
        cli(reg, "alias", "set", shout.repo, "prod", "1")
    deadline = time.monotonic() + 30
    while complete(url, f"{shout.repo}@prod", prompt)[0] != before:
        assert time.monotonic() < deadline, "prod did not move back to version 1"
        time.sleep(0.5)
    assert {n: c.restarts for n, c in stack.components.items()} == starts
    assert all(c.alive for c in stack.components.values())


def _load(urls: list[str], jobs: list[tuple[str, str]], workers: int,
          on_progress=None) -> list[tuple[str, str, BaseException | None]]:
    """Send every (model, prompt) job, round-robin over ``urls``; (model, prompt, error)."""
    results: list[tuple[str, str, BaseException | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        model, prompt = jobs[i]
        try:
            complete(urls[i % len(urls)], model, prompt)
            err = None
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            err = exc
        with lock:
            results.append((model, prompt, err))
            done = len(results)
        if on_progress:
            on_progress(done)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(jobs))))
    return results


def _jobs(demo, n: int) -> list[tuple[str, str]]:
    pool = []
    for adapter in demo.adapters:
        for prompt, _ in adapter.test_pairs[:2]:
            pool.append(("auto", prompt))
            pool.append((f"{adapter.repo}/1", prompt))
    return [pool[i % len(pool)] for i in range(n)]


def test_registry_restart_mid_run_loses_nothing(system):
    stack, demo, reg = system["stack"], system["demo"], system["registry"]
    before = {a.repo: cli(reg, "ls", a.repo) for a in demo.adapters}
    before_repos = cli(reg, "ls")
    restarted = threading.Event()

    def progress(done: int) -> None:
        if done == 8 and not restarted.is_set():
            restarted.set()
            stack.restart("registry", timeout=120)

    urls = [stack.url("gateway-1"), stack.url("gateway-2")]
    jobs = _jobs(demo, 40)
    # Every gateway has resolved these refs once: while the registry is away it serves them
    # from its cache; refs it never saw would get a 503 with Retry-After.
    for url in urls:
        for model, prompt in set(jobs):
            complete(url, model, prompt)
    results = _load(urls, jobs, workers=3, on_progress=progress)
    assert restarted.is_set()
    failures = [(m, p, repr(e)) for m, p, e in results if e is not None]
    assert not failures, failures
    after = {a.repo: cli(reg, "ls", a.repo) for a in demo.adapters}
    assert after == before
    assert cli(reg, "ls") == before_repos
    # A ref no gateway has resolved yet needs the restarted registry: it answers.
    shout = demo.adapter("shout")
    answer, headers = complete(urls[0], f"{shout.repo}/2", shout.test_pairs[1][0])
    assert answer and headers.get("x-quiver-adapter", "").startswith(f"{shout.repo}/2")


def test_killing_a_backend_during_a_load_run_fails_no_request(system):
    stack, demo = system["stack"], system["demo"]
    killed = threading.Event()

    def progress(done: int) -> None:
        if done == 10 and not killed.is_set():
            killed.set()
            stack.kill("backend-b")

    urls = [stack.url("gateway-1"), stack.url("gateway-2")]
    results = _load(urls, _jobs(demo, 48), workers=4, on_progress=progress)
    assert killed.is_set() and not stack.components["backend-b"].alive
    failures = [(m, p, repr(e)) for m, p, e in results if e is not None]
    assert not failures, failures
    answer, headers = complete(urls[1], "auto", demo.adapters[1].test_pairs[0][0])
    assert headers.get("x-quiver-backend") == "backend-a"
