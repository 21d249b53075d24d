"""The OpenAI-compatible server: a real uvicorn server on loopback, called with the official ``openai`` client."""

import contextlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from recyclegpt import cli
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.config import PRESETS
from recyclegpt.generate import Engine
from recyclegpt.recycle import RecycleGPT
from recyclegpt.server import create_app

MODEL = "tiny-test"
GREEDY = {"temperature": 0}
USAGE_FIELDS = {"prompt_tokens", "completion_tokens", "total_tokens", "tokens_per_full_call", "full_calls",
                "module_calls", "accepted_drafts", "rejected_drafts"}
ERROR_FIELDS = {"message", "type", "param", "code"}


class CheckedEngine(Engine):
    """An engine whose batches count their cycles and the rows in them, pause after each cycle if asked
    to, and record every row that joined and how it left."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pause, self.cycles, self.most_rows = 0.0, 0, 0
        self.joined: list[list[int]] = []  # each row's prompt ids, as rows join

    def batch(self, strategy, sampling):
        batch = super().batch(strategy, sampling)
        add, step = batch.add, batch.step

        def checked_add(prompts, *args):
            self.joined += [list(p) for p in prompts]
            return add(prompts, *args)

        def checked_step():
            self.cycles += 1
            self.most_rows = max(self.most_rows, len(batch.rows))
            out = step()
            time.sleep(self.pause)
            return out

        batch.add, batch.step = checked_add, checked_step
        return batch


def tiny_engine(cls: type[Engine] = CheckedEngine, module: bool = True) -> Engine:
    """A tiny random model on bytes. Its default init repeats the last byte forever; wider random weights
    make greedy outputs vary from token to token, so that comparisons between outputs mean something."""
    torch.manual_seed(0)
    model = RecycleGPT.from_config(PRESETS["tiny"].model, PRESETS["tiny"].recycle).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return cls(model.backbone, ByteTokenizer(), model.module if module else None)


@contextlib.contextmanager
def serving(app):
    """Run ``app`` with uvicorn on a free loopback port in a background thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine, MODEL)) as base:
        yield base


@pytest.fixture
def client(url) -> openai.OpenAI:
    return client_for(url)


def chat_prompt(engine: Engine, text: str) -> str:
    return engine.tokenizer.apply_chat([{"role": "user", "content": text}])


def assert_healthy(url: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2, **GREEDY).choices[0].text


def test_completion_matches_engine(client, engine):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, **GREEDY)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == engine.generate(["Hello"], max_new_tokens=12)[0].text
    assert r.choices[0].finish_reason == "length"
    u = r.usage.model_dump()
    assert USAGE_FIELDS <= set(u)
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (5, 12, 17)
    assert (u["tokens_per_full_call"], u["full_calls"], u["module_calls"]) == (1.0, 12, 0)


def test_completion_batch_and_stop(client, engine):
    r = client.completions.create(model=MODEL, prompt=["Hello", "The cat sat"], max_tokens=6, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    expected = [g.text for g in engine.generate(["Hello", "The cat sat"], max_new_tokens=6)]
    assert [c.text for c in r.choices] == expected
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, **GREEDY).choices[0].text
    stop = full[4:6]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_matches_engine(client, engine):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_completion_tokens=10, **GREEDY
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == engine.generate([chat_prompt(engine, "Hi there")], max_new_tokens=10)[0].text
    assert USAGE_FIELDS <= set(r.usage.model_dump()) and r.usage.completion_tokens == 10


def test_streaming_equals_non_streamed(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=20, **GREEDY).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=20, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == plain
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Tell me"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_strategy_override_is_lossless(client):
    standard = client.completions.create(model=MODEL, prompt="Recycle", max_tokens=16, **GREEDY)
    verified = client.completions.create(
        model=MODEL, prompt="Recycle", max_tokens=16, extra_body={"strategy": "verified", "draft_len": 2}, **GREEDY
    )
    assert verified.choices[0].text == standard.choices[0].text
    u = verified.usage.model_dump()
    assert u["module_calls"] > 0 and u["accepted_drafts"] + u["rejected_drafts"] > 0
    assert u["tokens_per_full_call"] == pytest.approx(16 / u["full_calls"])
    wide = client.completions.create(
        model=MODEL, prompt="Recycle", max_tokens=16,
        extra_body={"strategy": "verified", "draft_len": 2, "draft_width": 3}, **GREEDY
    )
    assert wide.choices[0].text == standard.choices[0].text
    speed = client.completions.create(model=MODEL, prompt="Recycle", max_tokens=16,
                                      extra_body={"strategy": "speed", "early_exit_layer": 1}, **GREEDY)
    assert speed.choices[0].text == standard.choices[0].text
    with pytest.raises(openai.BadRequestError, match="early exit layer must be in"):
        client.completions.create(model=MODEL, prompt="Recycle", max_tokens=4,
                                  extra_body={"strategy": "speed", "early_exit_layer": 7})
    with pytest.raises(openai.BadRequestError, match="draft_width"):
        client.completions.create(model=MODEL, prompt="Recycle", max_tokens=4,
                                  extra_body={"strategy": "verified", "draft_width": 0})


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL}


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "gpt-9"}, 404, "model"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"max_tokens": 10_000}, 400, None),
        ({"n": 2}, 400, "n"),
        ({"extra_body": {"strategy": "psychic"}}, 400, "strategy"),
        ({"stop": [""]}, 400, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(client, url, kwargs, status, param):
    request = {"model": MODEL, "prompt": "Hello", "max_tokens": 4} | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**request)
    assert info.value.status_code == status
    assert set(info.value.body) == ERROR_FIELDS and info.value.param == param and info.value.message
    assert_healthy(url, client)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "tiny-test"}', "prompt"),
        (b'{"model": "tiny-test", "prompt": "a", "max_tokens": "many"}', "max_tokens"),
        (b'{"model": "tiny-test", "prompt": 7}', "prompt"),
    ],
)
def test_malformed_and_mistyped_bodies_get_400(client, url, body, param):
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == ERROR_FIELDS
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert_healthy(url, client)


def test_other_bad_requests(client, url):
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0")
    r = httpx.get(f"{url}/v1/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_FIELDS
    assert_healthy(url, client)


def test_seeded_sampling_repeats(client):
    runs = [client.completions.create(model=MODEL, prompt="Dice", max_tokens=12, temperature=0.9, seed=7)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_api_key_and_missing_module():
    with serving(create_app(tiny_engine(module=False), MODEL, api_key="sesame")) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert info.value.code == "invalid_api_key"
        r = httpx.post(f"{url}/v1/completions", content=b"{bad")  # the key is checked before the body
        assert r.status_code == 401 and set(r.json()["error"]) == ERROR_FIELDS
        assert httpx.get(f"{url}/health").status_code == 200
        client = client_for(url, api_key="sesame")
        with pytest.raises(openai.BadRequestError, match="needs a recyclable module"):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"strategy": "verified"})
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def _settled(scheduler, timeout: float = 5.0) -> None:
    """Wait until the scheduler holds no row and no waiting prompt (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while scheduler.rows or scheduler.waiting:
        assert time.monotonic() < deadline, f"{scheduler.rows} rows and {scheduler.waiting} prompts left behind"
        time.sleep(0.01)


def test_disconnecting_clients_stop_their_work():
    engine = tiny_engine()
    engine.pause = 0.01
    app = create_app(engine, MODEL, max_batch=1)
    with serving(app) as url:
        client = client_for(url)
        # 1. A stream whose client leaves after the first chunk stops decoding: its row leaves.
        stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=200, stream=True, **GREEDY)
        next(iter(stream))
        stream.close()
        _settled(app.state.scheduler)
        assert engine.cycles < 100
        # 2. A request whose client gives up while it waits in the queue is dropped, never run.
        busy = threading.Thread(target=lambda: list(client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=100, stream=True, **GREEDY)))
        busy.start()
        while len(engine.joined) < 2:  # the busy stream holds the only row
            assert busy.is_alive(), "the busy stream ended before it was seen"
            time.sleep(0.01)
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.2).completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        busy.join()
        _settled(app.state.scheduler)
        assert len(engine.joined) == 2
        # 3. The server goes on serving.
        engine.pause = 0
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=20, stream=True, **GREEDY))
        assert text == engine.generate(["Hi"], max_new_tokens=20)[0].text


def test_a_full_queue_answers_503_and_loses_nothing():
    engine = tiny_engine()
    engine.pause = 0.02
    app = create_app(engine, MODEL, max_batch=1, max_waiting=1)
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        client = client_for(url)
        running = pool.submit(lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=40, **GREEDY))
        while not engine.joined:
            time.sleep(0.01)
        waiting = pool.submit(lambda: client.completions.create(model=MODEL, prompt="Yo", max_tokens=4, **GREEDY))
        while not app.state.scheduler.waiting:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError, match="server is busy: 1 prompts are waiting") as err:
            client.completions.create(model=MODEL, prompt="Hey", max_tokens=4, **GREEDY)
        assert err.value.status_code == 503 and err.value.body["code"] == "server_busy"
        assert running.result().choices[0].text == engine.generate(["Hi"], max_new_tokens=40)[0].text
        assert waiting.result().choices[0].text == engine.generate(["Yo"], max_new_tokens=4)[0].text
    with pytest.raises(ValueError, match="max_batch and max_waiting must be >= 1"):
        create_app(engine, MODEL, max_batch=0)


@pytest.mark.parametrize("max_batch", [1, 16])
def test_load_concurrent_clients(max_batch):
    """16 clients at once, streaming and not, completions and chat, standard, verified and speed, some leaving
    mid-stream: every answer arrives and equals the same request served alone (greedy), and no row is
    left behind. With ``max_batch`` 16 the requests really share cycles."""
    engine = tiny_engine()
    app = create_app(engine, MODEL, max_batch=max_batch)
    clients, per_client = 16, 3
    prompts = ["Hello", "The cat", "Once upon a time", "Speed", "Recycled states", "abc", "Why?", "Tell me more"]

    def ask(c: openai.OpenAI, kind: str, prompt: str, stream: bool, strategy: str, leave: bool = False) -> str:
        common = {"model": MODEL, "max_tokens": 16, "stream": stream, "extra_body": {"strategy": strategy}} | GREEDY
        if kind == "chat":
            r = c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
            if leave:  # read one chunk, then hang up
                next(iter(r)), r.close()
                return ""
            return "".join(x.choices[0].delta.content or "" for x in r) if stream else r.choices[0].message.content
        r = c.completions.create(prompt=prompt, **common)
        if leave:
            next(iter(r)), r.close()
            return ""
        return "".join(x.choices[0].text for x in r) if stream else r.choices[0].text

    plan = [[(("completion", "chat")[(i + j) % 2], prompts[(i + 3 * j) % len(prompts)], (i + j) % 3 == 0,
              {0: "verified", 2: "speed"}.get(i % 4, "standard"), (i + j) % 3 == 0 and i % 2 == 1)
             for j in range(per_client)] for i in range(clients)]
    with serving(app) as url:
        alone = {(kind, p, s): ask(client_for(url), kind, p, False, s) for kind in ("completion", "chat")
                 for p in prompts for s in ("standard", "verified", "speed")}
        engine.most_rows = 0

        def run(requests: list[tuple]) -> list[tuple[tuple, str, float]]:
            c = client_for(url)
            return [(req, ask(c, *req), 0.0) for req in requests]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(run, plan) for r in rs]
        wall = time.perf_counter() - t0
        _settled(app.state.scheduler)
    assert len(results) == clients * per_client
    left = 0
    for (kind, prompt, _, strategy, leave), text, _ in results:
        if leave:
            left += 1
        else:
            assert text == alone[(kind, prompt, "standard")] == alone[(kind, prompt, strategy)]
    assert left >= 3
    assert (engine.most_rows > 4) if max_batch > 1 else engine.most_rows == 1
    print(f"\nload, max batch {max_batch}: {len(results)} requests from {clients} concurrent clients in {wall:.2f} s")


def test_cli_chat_keeps_history(monkeypatch, capsys):
    engine = tiny_engine()
    prompts = []
    real_stream = engine.stream

    def recording_stream(prompt, **kwargs):
        prompts.append(prompt)
        return real_stream(prompt, **kwargs)

    monkeypatch.setattr(engine, "stream", recording_stream)
    monkeypatch.setattr(cli, "load", lambda *args, **kwargs: (engine, None))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHow are you\n/exit\nnever read\n"))
    assert cli.main(["chat", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    first = engine.generate([chat_prompt(engine, "Hello")], max_new_tokens=6)[0].text
    assert len(prompts) == 2 and first in out
    assert prompts[1] == engine.tokenizer.apply_chat([
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "How are you"},
    ])
    assert err.count("tok/s") == 2 and "tokens per full call" in err


def test_cli_serve_builds_the_app(monkeypatch, capsys):
    calls = []
    base = type("Base", (), {"name": "tiny-base", "chat": False, "tokenizer": ByteTokenizer()})
    monkeypatch.setattr(cli, "load", lambda model, module, *a, **kw: (tiny_engine(module=module is not None), base))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert cli.main(["serve", "--strategy", "verified", "--module", "m.safetensors", "--port", "8123"]) == 0
    app, kw = calls[0]
    assert kw == {"host": "127.0.0.1", "port": 8123} and app.title == "RecycleGPT"
    assert cli.main(["serve", "--strategy", "verified"]) == 2 and len(calls) == 1
    assert "needs a recyclable module" in capsys.readouterr().err
