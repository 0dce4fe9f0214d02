"""The HTTP server in-process (FastAPI's TestClient): every endpoint, keys and tenants, uploads of
both formats, and bad input of every kind answered with the right 4xx JSON error while the server
keeps serving and nothing on disk changes."""
import io
import json

import pytest
import torch

import tiny
import unipeft as up
from test_serving_common import base, load_model, write_deltas
from unipeft.serving import Engine

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fastapi.testclient import TestClient

    from unipeft.serving.app import create_app

    gpt2, bert = base(tmp_path_factory, "gpt2"), base(tmp_path_factory, "bert")
    deltas = tmp_path_factory.mktemp("deltas")
    write_deltas(gpt2, deltas, {"g-lora": "lora", "g-prompt": "prompt"})
    write_deltas(bert, deltas, {"b-lora": "lora"}, seed=7)
    spare = tmp_path_factory.mktemp("spare")   # deltas to upload
    write_deltas(gpt2, spare, {"up-ia3": "ia3", "up-lora": "lora"}, seed=20)
    engines = [Engine(gpt2, None, cache_mb=16, name="tiny-gpt2", max_wait_ms=2),
               Engine(bert, None, cache_mb=16, name="tiny-bert", max_wait_ms=2)]
    app = create_app(engines, deltas, admin_key=ADMIN, max_upload_mb=4)
    with TestClient(app) as client:
        yield {"client": client, "deltas": deltas, "spare": spare, "gpt2": gpt2, "bert": bert,
               "server": app.state.server, "tmp": tmp_path_factory}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def err(r, status, match=""):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == status and match.lower() in body["error"]["message"].lower(), body
    return body["error"]["message"]


def files_of(folder, names=("delta.json", "delta.safetensors")):
    return {n: (n, (folder / n).read_bytes()) for n in names}


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".unipeft" not in p.parts)


@pytest.fixture(scope="module")
def tenants(env):
    c = env["client"]
    keys = {}
    for t in ("acme", "globex"):
        r = c.post("/v1/tenants", json={"name": t}, headers=auth(ADMIN))
        assert r.status_code == 201, r.text
        keys[t] = r.json()["key"]
    return keys


def test_health_models_and_keys(env, tenants):
    c = env["client"]
    h = c.get("/healthz")
    assert h.status_code == 200 and set(h.json()["bases"]) == {"tiny-gpt2", "tiny-bert"}
    ids = {m["id"] for m in c.get("/v1/models", headers=auth(ADMIN)).json()["data"]}
    assert {"tiny-gpt2", "tiny-bert", "g-lora", "g-prompt", "b-lora"} <= ids
    err(c.get("/v1/models"), 401, "missing API key")
    err(c.get("/v1/models", headers=auth("upk_wrong")), 401, "invalid API key")
    err(c.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "missing")
    mine = {m["id"] for m in c.get("/v1/models", headers=auth(tenants["acme"])).json()["data"]}
    assert mine >= {"tiny-gpt2", "tiny-bert"} and "g-lora" not in mine   # the admin's deltas are the admin's
    err(c.post("/v1/tenants", json={"name": "evil"}, headers=auth(tenants["acme"])), 403, "admin key")
    err(c.get("/metrics", headers=auth(tenants["acme"])), 403, "admin key")
    err(c.post("/v1/tenants", json={"name": "Bad Name"}, headers=auth(ADMIN)), 400, "tenant name")
    err(c.post("/v1/tenants", json={"name": "acme"}, headers=auth(ADMIN)), 400, "exists")
    assert {t["name"] for t in c.get("/v1/tenants", headers=auth(ADMIN)).json()["data"]} >= {"acme", "globex"}
    extra = c.post("/v1/tenants/acme/keys", headers=auth(ADMIN)).json()["key"]
    assert c.get("/v1/models", headers=auth(extra)).status_code == 200


def test_completions_chat_streaming_and_classify(env):
    c, engine = env["client"], env["server"].engines["tiny-gpt2"]
    r = c.post("/v1/completions", json={"model": "g-lora", "prompt": "the movie was", "max_tokens": 5,
                                        "temperature": 0}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    body = r.json()
    alone = engine.complete("g-lora", "the movie was", max_tokens=5)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == alone["text"]
    assert body["usage"]["completion_tokens"] == alone["completion_tokens"] == 5
    two = c.post("/v1/completions", json={"model": "g-lora", "prompt": ["the movie was", "good"], "max_tokens": 5},
                 headers=auth(ADMIN)).json()
    assert [ch["index"] for ch in two["choices"]] == [0, 1] and two["choices"][0]["text"] == alone["text"]
    base_answer = c.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "the movie was", "max_tokens": 5},
                         headers=auth(ADMIN)).json()["choices"][0]["text"]
    assert base_answer == engine.complete(None, "the movie was", max_tokens=5)["text"]

    # streaming: the events' text adds up to the answer sent without streaming
    with c.stream("POST", "/v1/completions", json={"model": "g-lora", "prompt": "the movie was", "max_tokens": 5,
                                                   "stream": True}, headers=auth(ADMIN)) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == alone["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    messages = [{"role": "user", "content": "name = Alpha food = italian"}]
    chat = c.post("/v1/chat/completions", json={"model": "g-prompt", "messages": messages, "max_tokens": 4},
                  headers=auth(ADMIN)).json()
    prompt = engine.chat_prompt(messages)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content":
                                             engine.complete("g-prompt", prompt, max_tokens=4)["text"]}
    with c.stream("POST", "/v1/chat/completions", json={"model": "g-prompt", "messages": messages, "max_tokens": 4,
                                                        "stream": True}, headers=auth(ADMIN)) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln and ln != "data: [DONE]"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == chat["choices"][0]["message"]["content"]

    cls = c.post("/v1/classify", json={"model": "b-lora", "input": ["the film was good", ["a", "b c"]]},
                 headers=auth(ADMIN))
    assert cls.status_code == 200, cls.text
    data = cls.json()["data"]
    assert len(data) == 2 and set(data[0]["scores"]) == {"LABEL_0", "LABEL_1"}
    assert abs(sum(data[0]["scores"].values()) - 1) < 1e-5 and data[0]["label"] in data[0]["scores"]
    bert = env["server"].engines["tiny-bert"]
    assert data[0]["label"] == bert.classify("b-lora", ["the film was good"])[0]["label"]
    usage = cls.json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(
        bert.classify("b-lora", [x])[0]["prompt_tokens"] for x in ["the film was good", ["a", "b c"]]) > 0
    # seeded sampling through HTTP: the same seed, the same text
    seeded = [c.post("/v1/completions", json={"model": "g-lora", "prompt": "the movie was", "max_tokens": 5,
                                              "temperature": 1.5, "seed": 11}, headers=auth(ADMIN)).json()
              for _ in range(2)]
    assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]
    err(c.post("/v1/completions", json={"model": "g-lora", "prompt": "x", "seed": "7"}, headers=auth(ADMIN)), 400,
        "seed")
    err(c.post("/v1/classify", json={"model": "g-lora", "input": ["x"]}, headers=auth(ADMIN)), 400, "language model")
    err(c.post("/v1/completions", json={"model": "b-lora", "prompt": "x"}, headers=auth(ADMIN)), 400, "classifier")


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(env):
    c = env["client"]
    h = {**auth(ADMIN), "Content-Type": "application/json"}
    err(c.post("/v1/completions", content=b"{not json", headers=h), 400, "not valid JSON")
    err(c.post("/v1/completions", content=b"[1, 2]", headers=h), 400, "JSON object")
    err(c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=auth(ADMIN)), 404, "does not exist")
    err(c.post("/v1/completions", json={"prompt": "x"}, headers=auth(ADMIN)), 400, "'model' is required")
    err(c.post("/v1/completions", json={"model": "g-lora", "prompt": 3}, headers=auth(ADMIN)), 400, "prompt")
    err(c.post("/v1/completions", json={"model": "g-lora", "prompt": "x", "max_tokens": "5"}, headers=auth(ADMIN)),
        400, "max_tokens")
    err(c.post("/v1/completions", json={"model": "g-lora", "prompt": "x", "n": 2}, headers=auth(ADMIN)), 400, "'n'")
    err(c.post("/v1/completions", json={"model": "g-lora", "prompt": "x", "max_tokens": 100000}, headers=auth(ADMIN)),
        400, "max_tokens")
    err(c.post("/v1/chat/completions", json={"model": "g-lora", "messages": "hi"}, headers=auth(ADMIN)), 400,
        "messages")
    err(c.post("/v1/classify", json={"model": "b-lora", "input": [1]}, headers=auth(ADMIN)), 400, "input")
    err(c.get("/v1/nothing-here", headers=auth(ADMIN)), 404, "not found")
    err(c.post("/v1/completions", json={"model": "../../etc/passwd", "prompt": "x"}, headers=auth(ADMIN)), 404)
    ok = c.post("/v1/completions", json={"model": "g-lora", "prompt": "good", "max_tokens": 2}, headers=auth(ADMIN))
    assert ok.status_code == 200


def test_tenant_upload_isolation_and_delete(env, tenants):
    c, spare, deltas = env["client"], env["spare"], env["deltas"]
    acme, globex = auth(tenants["acme"]), auth(tenants["globex"])
    r = c.post("/v1/deltas", files=files_of(spare / "up-ia3"), data={"name": "mine"}, headers=acme)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "mine" and r.json()["method"] == "ia3" and r.json()["base"] == "tiny-gpt2"
    ask = {"model": "mine", "prompt": "the movie was", "max_tokens": 4}
    got = c.post("/v1/completions", json=ask, headers=acme)
    assert got.status_code == 200
    reference = load_model(env["gpt2"])
    up.load(reference, spare / "up-ia3")
    engine = env["server"].engines["tiny-gpt2"]
    assert got.json()["choices"][0]["text"] == engine.complete("acme/mine", "the movie was", max_tokens=4)["text"]
    # another tenant: 404, the same message as for a delta that exists nowhere
    other = err(c.post("/v1/completions", json=ask, headers=globex), 404)
    nowhere = err(c.post("/v1/completions", json={**ask, "model": "never-made"}, headers=globex), 404)
    assert other.replace("'mine'", "X") == nowhere.replace("'never-made'", "X")
    err(c.delete("/v1/deltas/mine", headers=globex), 404)
    assert "mine" not in {m["id"] for m in c.get("/v1/models", headers=globex).json()["data"]}
    assert "mine" in {m["id"] for m in c.get("/v1/models", headers=acme).json()["data"]}
    assert "acme/mine" in {m["id"] for m in c.get("/v1/models", headers=auth(ADMIN)).json()["data"]}
    assert c.post("/v1/completions", json={**ask, "model": "acme/mine"}, headers=auth(ADMIN)).status_code == 200
    # the same name for another tenant is that tenant's own delta
    r = c.post("/v1/deltas", files=files_of(spare / "up-lora"), data={"name": "mine"}, headers=globex)
    assert r.status_code == 201, r.text
    a = c.post("/v1/completions", json=ask, headers=acme).json()["choices"][0]["text"]
    b = c.post("/v1/completions", json=ask, headers=globex).json()["choices"][0]["text"]
    assert a == got.json()["choices"][0]["text"] and a != b
    err(c.post("/v1/deltas", files=files_of(spare / "up-ia3"), data={"name": "mine"}, headers=acme), 409, "exists")
    assert (deltas / ".tenants" / "acme" / "mine" / "delta.safetensors").is_file()
    r = c.delete("/v1/deltas/mine", headers=acme)
    assert r.status_code == 200 and r.json()["deleted"] is True
    err(c.post("/v1/completions", json=ask, headers=acme), 404)
    assert not (deltas / ".tenants" / "acme" / "mine").exists()
    assert c.post("/v1/completions", json=ask, headers=globex).json()["choices"][0]["text"] == b


def test_peft_adapter_upload(env):
    c, tmp = env["client"], env["tmp"].mktemp("peft")
    model = load_model(env["gpt2"])
    torch.manual_seed(3)
    up.attach(model, up.LoRA(r=2, alpha=4, targets=["c_attn"]), name="p")
    with torch.no_grad():
        for p in up.engine.registry(model).deltas["p"].parameters():
            p.add_(torch.randn(p.shape) * 0.5)
    up.export_peft(model, tmp / "adapter", name="p")
    expected = env["server"].engines["tiny-gpt2"]
    r = c.post("/v1/deltas", files=files_of(tmp / "adapter", ("adapter_config.json", "adapter_model.safetensors")),
               data={"name": "from-peft", "base": "tiny-gpt2"}, headers=auth(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["method"] == "lora" and (env["deltas"] / "from-peft" / "delta.json").is_file()
    text = c.post("/v1/completions", json={"model": "from-peft", "prompt": "the movie was", "max_tokens": 4},
                  headers=auth(ADMIN)).json()["choices"][0]["text"]
    up.activate(model, ["p"])
    ids = expected.tokenizer("the movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=4)
    assert text == expected.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    err(c.post("/v1/deltas", files=files_of(tmp / "adapter", ("adapter_config.json", "adapter_model.safetensors")),
               headers=auth(ADMIN)), 400, "'name'")


def bad_deltas(env):
    """Folders of deltas each wrong in one way."""
    tmp, gpt2 = env["tmp"].mktemp("bad"), env["gpt2"]
    model = load_model(gpt2)
    up.attach(model, up.LoRA(r=2), name="zero")             # initial values: B = 0, changes nothing
    up.save(model, tmp / "zero", name="zero")
    up.detach(model, "zero")
    up.attach(model, up.Freeze(train_last=1), name="frozen")
    up.save(model, tmp / "frozen", name="frozen")
    up.detach(model, "frozen")
    other = load_model(tiny.save(tmp / "other-base", "gpt2", seed=5, dropout=False))
    write_deltas(str(tmp / "other-base"), tmp, {"foreign": "lora"})
    del other
    return tmp


def test_bad_uploads_are_refused_and_change_nothing(env):
    c, spare, deltas = env["client"], env["spare"], env["deltas"]
    bad = bad_deltas(env)
    before = listing(deltas)
    good = files_of(spare / "up-lora")
    meta = json.loads(good["delta.json"][1])

    def post(files, status, match, data=None):
        err(c.post("/v1/deltas", files=files, data=data or {"name": "x1"}, headers=auth(ADMIN)), status, match)

    tensors = good["delta.safetensors"][1]
    post({**good, "delta.safetensors": ("delta.safetensors", tensors[: len(tensors) // 2])}, 400, "not a valid safetensors")
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    post({**good, "delta.safetensors": ("delta.safetensors", buf.getvalue())}, 415, "pickle")
    post({"delta.json": good["delta.json"], "adapter_model.bin": ("adapter_model.bin", buf.getvalue())}, 415, "pickle")
    post(good, 400, "not allowed", data={"name": "../escape"})
    post(good, 400, "not allowed", data={"name": "a/b"})
    post(good, 400, "not allowed", data={"name": ".hidden"})
    post({**good, "evil.sh": ("../../evil.sh", b"rm -rf /")}, 400, "unexpected file")
    post({"delta.json": good["delta.json"]}, 400, "upload either")
    post({**good, "delta.json": ("delta.json", b"{oops")}, 400, "not valid JSON")
    unknown = {**meta, "method": {**meta["method"], "kind": "magic"}}
    post({**good, "delta.json": ("delta.json", json.dumps(unknown).encode())}, 400, "unknown method 'magic'")
    big_r = {**meta, "method": {**meta["method"], "options": {**meta["method"]["options"], "r": 100000}}}
    post({**good, "delta.json": ("delta.json", json.dumps(big_r).encode())}, 400, "r=100000")
    wrong_r = {**meta, "method": {**meta["method"], "options": {**meta["method"]["options"], "r": 3}}}
    post({**good, "delta.json": ("delta.json", json.dumps(wrong_r).encode())}, 400, "does not fit")
    post(files_of(bad / "foreign"), 400, "matches no served base")
    post(files_of(bad / "zero"), 400, "changes nothing")
    post(files_of(bad / "frozen"), 400, "cannot route per example")
    big = c.post("/v1/deltas", files={**good, "delta.safetensors": ("delta.safetensors", b"\0" * (5 << 20))},
                 data={"name": "x1"}, headers=auth(ADMIN))
    err(big, 413, "limit")
    err(c.post("/v1/deltas", json={"name": "x"}, headers=auth(ADMIN)), 415, "multipart")
    err(c.post("/v1/deltas", files=good, data={"name": "tiny-gpt2"}, headers=auth(ADMIN)), 409, "base")
    err(c.post("/v1/deltas", files=good, data={"name": "x1"}), 401)
    assert listing(deltas) == before    # nothing stored, nothing half-written
    ok = c.post("/v1/completions", json={"model": "g-lora", "prompt": "good", "max_tokens": 2}, headers=auth(ADMIN))
    assert ok.status_code == 200


def test_metrics_have_per_delta_labels(env):
    c = env["client"]
    for _ in range(2):
        c.post("/v1/completions", json={"model": "g-lora", "prompt": "good", "max_tokens": 3}, headers=auth(ADMIN))
    text = c.get("/metrics", headers=auth(ADMIN)).text
    lines = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    key = 'base="tiny-gpt2",delta="g-lora"'
    assert lines[f"unipeft_requests_total{{{key}}}"] >= 2
    assert lines[f"unipeft_completion_tokens_total{{{key}}}"] >= 6
    assert lines[f"unipeft_cache_hits_total{{{key}}}"] >= 1
    assert lines[f"unipeft_load_seconds_total{{{key}}}"] > 0
    assert lines[f'unipeft_request_latency_seconds_count{{{key}}}'] >= 2
    assert f"unipeft_evictions_total{{{key}}}" in lines
    assert lines['unipeft_cache_capacity_bytes{base="tiny-gpt2"}'] == 16 * 2 ** 20
    assert lines['unipeft_batch_rows_total{base="tiny-gpt2"}'] >= lines['unipeft_batches_total{base="tiny-gpt2"}'] >= 2
    assert "# TYPE unipeft_batches_total counter" in text
    assert "# TYPE unipeft_request_latency_seconds histogram" in text


def test_without_an_admin_key_loopback_only_and_no_keys(env, tmp_path):
    from fastapi.testclient import TestClient

    from unipeft.cli import main
    from unipeft.serving.app import create_app
    from unipeft.serving.cli import check_host

    with pytest.raises(up.UnipeftError, match="refusing to listen on '0.0.0.0' without an admin key"):
        check_host("0.0.0.0", None)
    check_host("127.0.0.1", None)
    check_host("::1", None)
    check_host("0.0.0.0", "k")
    assert main(["serve", "--model", env["gpt2"], "--deltas", str(tmp_path), "--host", "0.0.0.0"]) == 2
    write_deltas(env["gpt2"], tmp_path, {"solo": "ia3"})
    engine = Engine(env["gpt2"], None, cache_mb=4, name="g", max_wait_ms=1)
    with TestClient(create_app(engine, tmp_path)) as c:
        r = c.post("/v1/completions", json={"model": "solo", "prompt": "good", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.get("/metrics").status_code == 200


def test_tenants_command(tmp_path, capsys):
    from unipeft.cli import main
    from unipeft.serving.store import Store, db_path

    assert main(["tenants", "add", "initech", "--deltas", str(tmp_path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("upk_") and len(key) > 40
    store = Store(db_path(tmp_path))
    assert store.tenant_for_key(key) == "initech" and store.tenant_for_key(key + "x") is None
    raw = db_path(tmp_path).read_bytes()
    assert key.encode() not in raw                    # stored hashed, never in clear
    store.close()
    assert main(["tenants", "list", "--deltas", str(tmp_path)]) == 0
    assert "initech" in capsys.readouterr().out
    assert main(["tenants", "add", "initech", "--deltas", str(tmp_path)]) == 2
    assert main(["tenants", "add", "Bad/Name", "--deltas", str(tmp_path)]) == 2
    assert main(["tenants", "remove", "initech", "--deltas", str(tmp_path)]) == 0
    assert main(["tenants", "remove", "initech", "--deltas", str(tmp_path)]) == 2


def test_replicas_sharing_a_deltas_directory(env, tmp_path):
    from fastapi.testclient import TestClient

    from unipeft.serving.app import create_app

    shared = tmp_path / "shared"
    apps = [create_app(Engine(env["gpt2"], None, cache_mb=4, name="g", max_wait_ms=1), shared, admin_key=ADMIN)
            for _ in range(2)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        key = a.post("/v1/tenants", json={"name": "acme"}, headers=auth(ADMIN)).json()["key"]
        r = a.post("/v1/deltas", files=files_of(env["spare"] / "up-ia3"), data={"name": "shared1"}, headers=auth(key))
        assert r.status_code == 201, r.text
        ask = {"model": "shared1", "prompt": "the movie was", "max_tokens": 3}
        ra, rb = (c.post("/v1/completions", json=ask, headers=auth(key)) for c in (a, b))
        assert rb.status_code == 200 and ra.json()["choices"] == rb.json()["choices"]
        assert b.delete("/v1/deltas/shared1", headers=auth(key)).status_code == 200
        err(a.post("/v1/completions", json=ask, headers=auth(key)), 404)


def test_serve_takes_the_precision_of_its_bases(tmp_path, monkeypatch, capsys):
    """``unipeft serve --dtype bf16`` hands the precision to every engine (default fp32); another value is
    refused with the valid choices."""
    from unipeft.cli import main
    from unipeft.serving import engine as engine_module

    seen = []

    def fake_engine(model, deltas, **kw):
        seen.append(kw["dtype"])
        raise up.UnipeftError("stop before listening")

    monkeypatch.setattr(engine_module, "Engine", fake_engine)
    assert main(["serve", "--model", "m", "--deltas", str(tmp_path), "--dtype", "bf16"]) == 2
    assert main(["serve", "--model", "m", "--deltas", str(tmp_path)]) == 2
    assert seen == ["bf16", "fp32"]
    capsys.readouterr()
    assert main(["serve", "--model", "m", "--deltas", str(tmp_path), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "'int8'" in err and "bf16" in err and seen == ["bf16", "fp32"]
