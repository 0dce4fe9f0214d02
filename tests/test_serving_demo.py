"""``unipeft serve`` with no arguments: the embedded SmolLM2 and MiniLM with example deltas of
several methods, written on first use and found again on the next start (real models from PyPI
packages, as the test command installs them)."""
import pytest

pytestmark = pytest.mark.real_model


def test_embedded_default_serves_both_bases_with_example_deltas(tmp_path):
    from fastapi.testclient import TestClient

    from unipeft.serving import demo
    from unipeft.serving.app import create_app

    engines = demo.engines(tmp_path, cache_mb=64, max_wait_ms=2, max_new_tokens=16)
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert written == sorted(list(demo._examples("smollm2")) + list(demo._examples("minilm")))
    with TestClient(create_app(engines, tmp_path)) as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["smollm2"]["kind"] == "generate" and models["minilm"]["kind"] == "classify"
        assert {models[n]["method"] for n in written} == {"lora", "ia3", "prompt_tuning", "adapter", "bitfit"}
        base = c.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is",
                                               "max_tokens": 4}).json()["choices"][0]["text"]
        texts = {n: c.post("/v1/completions", json={"model": n, "prompt": "The capital of France is",
                                                    "max_tokens": 4}).json()["choices"][0]["text"]
                 for n in demo._examples("smollm2")}
        assert isinstance(base, str) and len(set(texts.values()) | {base}) >= 2   # the deltas change answers
        chat = c.post("/v1/chat/completions", json={"model": "demo-lora", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
        cls = c.post("/v1/classify", json={"model": "demo-sentiment-lora", "input": ["a wonderful film"]}).json()
        assert set(cls["data"][0]["scores"]) == {"negative", "positive"}
    # a second start finds the example deltas and writes nothing
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("delta.safetensors")}
    for e in demo.engines(tmp_path, cache_mb=64):
        e.stop()
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("delta.safetensors")} == before
