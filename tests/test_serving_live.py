"""The server running for real on a loopback port: the official ``openai`` client (completions,
chat, streaming); a load test (2,000 requests over 50 deltas of mixed methods from 32 concurrent
clients, deltas uploaded and deleted meanwhile: no errors, every answer identical to the same
request sent alone, p50/p99 reported); a SIGKILL and restart that loses nothing."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_serving_common import METHODS, PROMPTS, TEXTS, Live, base, free_port, write_deltas
from unipeft.serving import Engine

ADMIN = "live-admin"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from unipeft.serving.app import create_app

    gpt2, bert = base(tmp_path_factory, "gpt2"), base(tmp_path_factory, "bert")
    deltas = tmp_path_factory.mktemp("deltas")
    methods = list(METHODS)
    gen = {f"g{i:02d}-{methods[i % 6]}": methods[i % 6] for i in range(30)}
    cls = {f"c{i:02d}-{methods[i % 6]}": methods[i % 6] for i in range(20)}
    write_deltas(gpt2, deltas, gen, seed=100)
    write_deltas(bert, deltas, cls, seed=200)
    spare = tmp_path_factory.mktemp("spare")
    write_deltas(gpt2, spare, {"hot-lora": "lora", "hot-prefix": "prefix"}, seed=300)
    # a cache smaller than the 50 deltas (so the load also loads and evicts), batches of up to 32 rows
    engines = [Engine(gpt2, None, cache_mb=0.04, name="lm", max_wait_ms=5, max_batch=32),
               Engine(bert, None, cache_mb=0.04, name="cls", max_wait_ms=5, max_batch=32)]
    app = create_app(engines, deltas, admin_key=ADMIN)
    server = Live(app)
    try:
        yield {"url": server.url, "gen": list(gen), "cls": list(cls), "spare": spare, "app": app}
    finally:
        server.stop()


def test_openai_client(live):
    from openai import OpenAI

    client = OpenAI(base_url=live["url"] + "/v1", api_key=ADMIN, max_retries=0, timeout=30)
    names = {m.id for m in client.models.list()}
    assert set(live["gen"]) <= names and "lm" in names
    delta = live["gen"][0]
    c = client.completions.create(model=delta, prompt="the movie was", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens >= 1
    direct = httpx.post(live["url"] + "/v1/completions", headers=H, timeout=30,
                        json={"model": delta, "prompt": "the movie was", "max_tokens": 5}).json()
    assert c.choices[0].text == direct["choices"][0]["text"]
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=delta, prompt="the movie was", max_tokens=5, temperature=0, stream=True)]
    assert "".join(pieces) == c.choices[0].text
    messages = [{"role": "user", "content": "name = Alpha food = italian"}]
    chat = client.chat.completions.create(model=live["gen"][2], messages=messages, max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    streamed = client.chat.completions.create(model=live["gen"][2], messages=messages, max_tokens=4, temperature=0,
                                              stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    from openai import AuthenticationError, NotFoundError

    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-delta", prompt="x", max_tokens=2)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=live["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


def ask(client, url, req):
    kind, model, x = req
    if kind == "gen":
        r = client.post(url + "/v1/completions", headers=H, json={"model": model, "prompt": x, "max_tokens": 4})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    r = client.post(url + "/v1/classify", headers=H, json={"model": model, "input": [x]})
    r.raise_for_status()
    d = r.json()["data"][0]
    return d["label"], d["scores"]


def same(a, b) -> bool:
    if isinstance(a, str):
        return a == b
    return a[0] == b[0] and all(abs(a[1][k] - b[1][k]) < 1e-5 for k in a[1])


def test_load_2000_requests_50_deltas_32_clients(live, capsys):
    url = live["url"]
    distinct = [("gen", d, p) for d in live["gen"] for p in PROMPTS[:2]] + \
               [("cls", d, t) for d in live["cls"] for t in TEXTS[:2]]
    with httpx.Client(timeout=60) as c:     # each request alone, one at a time
        alone = {r: ask(c, url, r) for r in distinct}
    assert len({v for (k, _, _), v in alone.items() if k == "gen"}) > 10   # the deltas answer differently
    rng = random.Random(0)
    work = [distinct[i % len(distinct)] for i in range(2000)]
    rng.shuffle(work)
    lock = threading.Lock()
    latencies, errors, wrong = [], [], []
    hot_log = []
    done = threading.Event()

    def client_thread(part):
        with httpx.Client(timeout=60) as c:
            for req in part:
                t = time.perf_counter()
                try:
                    got = ask(c, url, req)
                except Exception as e:
                    with lock:
                        errors.append(f"{req}: {e!r}")
                    continue
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    if not same(got, alone[req]):
                        wrong.append((req, got, alone[req]))

    def churn():   # deltas uploaded, used and deleted while the load runs
        files = {n: {f: (f, (live["spare"] / n / f).read_bytes()) for f in ("delta.json", "delta.safetensors")}
                 for n in ("hot-lora", "hot-prefix")}
        with httpx.Client(timeout=60) as c:
            i = 0
            while not done.is_set():
                name = f"hot{i}"
                src = ("hot-lora", "hot-prefix")[i % 2]
                r = c.post(url + "/v1/deltas", headers=H, files=files[src], data={"name": name})
                hot_log.append(("upload", r.status_code))
                r = c.post(url + "/v1/completions", headers=H, json={"model": name, "prompt": "good", "max_tokens": 2})
                hot_log.append(("use", r.status_code))
                hot_log.append(("delete", c.delete(f"{url}/v1/deltas/{name}", headers=H).status_code))
                i += 1

    threads = [threading.Thread(target=client_thread, args=(work[i::32],)) for i in range(32)]
    churner = threading.Thread(target=churn)
    t0 = time.perf_counter()
    churner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    churner.join()
    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert len(latencies) == 2000
    assert hot_log and all(s == {"upload": 201, "use": 200, "delete": 200}[k] for k, s in hot_log), hot_log
    lat = sorted(latencies)
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    metrics = httpx.get(url + "/metrics", headers=H).text
    evictions = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln.startswith("unipeft_evictions_total"))
    with capsys.disabled():
        print(f"\nload: 2000 requests, 50 deltas, 32 clients in {wall:.1f} s ({2000 / wall:.0f} req/s); "
              f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; {len(hot_log) // 3} deltas uploaded, used "
              f"and deleted meanwhile; {evictions:.0f} cache evictions")
    assert evictions > 0   # the cache was smaller than the deltas in use: loads and evictions happened under load


def wait_up(url, proc, timeout=60):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


def test_sigkill_and_restart_keep_registry_and_deltas(tmp_path_factory):
    gpt2 = base(tmp_path_factory, "gpt2")
    deltas = tmp_path_factory.mktemp("kill-deltas")
    spare = tmp_path_factory.mktemp("kill-spare")
    write_deltas(gpt2, deltas, {"admin-one": "lora"}, seed=400)
    write_deltas(gpt2, spare, {"t-ia3": "ia3", "a-prompt": "prompt"}, seed=500)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "unipeft", "serve", "--model", gpt2, "--deltas", str(deltas), "--port", str(port),
           "--cache-mb", "1"]
    env = {**os.environ, "UNIPEFT_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1"}

    def files(n):
        return {f: (f, (spare / n / f).read_bytes()) for f in ("delta.json", "delta.safetensors")}

    ask_ = {"prompt": "the movie was", "max_tokens": 4}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_up(url, proc)
        key = httpx.post(url + "/v1/tenants", headers=H, json={"name": "acme"}).json()["key"]
        T = {"Authorization": f"Bearer {key}"}
        assert httpx.post(url + "/v1/deltas", headers=T, files=files("t-ia3"), data={"name": "mine"}).status_code == 201
        assert httpx.post(url + "/v1/deltas", headers=H, files=files("a-prompt"),
                          data={"name": "uploaded"}).status_code == 201
        before = {m: httpx.post(url + "/v1/completions", headers=h, json={**ask_, "model": m}, timeout=30).json()
                  ["choices"][0]["text"] for m, h in (("mine", T), ("uploaded", H), ("admin-one", H))}
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_up(url, proc)
        assert {m["id"] for m in httpx.get(url + "/v1/models", headers=T).json()["data"]} >= {"mine"}
        assert {m["id"] for m in httpx.get(url + "/v1/models", headers=H).json()["data"]} >= \
            {"acme/mine", "uploaded", "admin-one"}
        after = {m: httpx.post(url + "/v1/completions", headers=h, json={**ask_, "model": m}, timeout=30).json()
                 ["choices"][0]["text"] for m, h in (("mine", T), ("uploaded", H), ("admin-one", H))}
        assert after == before
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        proc.kill()
        proc.wait(10)
