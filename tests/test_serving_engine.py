"""The serving engine on tiny models: byte-sized LRU cache, batches across deltas equal to each
request alone, hot add and remove, streaming and stop strings, one bad delta failing alone."""
import shutil
import threading

import pytest

from test_serving_common import PROMPTS, TEXTS, base, write_deltas
from unipeft.serving import DeltaNotFound, Engine
from unipeft.serving.engine import BadRequest

MIXED = {"lora0": "lora", "ia30": "ia3", "prompt0": "prompt", "prefix0": "prefix", "pfeiffer0": "pfeiffer",
         "bitfit0": "bitfit", "lora1": "lora", "ia31": "ia3"}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = base(tmp_path_factory, "gpt2")
    deltas = tmp_path_factory.mktemp("deltas-gpt2")
    write_deltas(path, deltas, MIXED)
    return path, deltas


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = base(tmp_path_factory, "bert")
    deltas = tmp_path_factory.mktemp("deltas-bert")
    write_deltas(path, deltas, {"lora0": "lora", "ia30": "ia3", "prompt0": "prompt", "bitfit0": "bitfit",
                                "pfeiffer0": "pfeiffer"}, seed=50)
    return path, deltas


def test_cache_is_sized_in_bytes_and_evicts_least_recently_used(gpt2):
    path, deltas = gpt2
    probe = Engine(path, deltas, cache_mb=64)
    try:
        for name in ("lora0", "ia30", "ia31"):
            probe.complete(name, "good", max_tokens=1)
        sizes = probe.loaded()
    finally:
        probe.stop()
    assert sizes["lora0"] > 4 * sizes["ia30"]  # a LoRA delta is many times an (IA)3 one
    # room for one LoRA delta, or for the LoRA delta's worth of (IA)3 deltas: bytes, not slots
    budget = sizes["lora0"] + sizes["ia30"] // 2
    e = Engine(path, deltas, cache_mb=budget / 2 ** 20)
    try:
        e.complete("ia30", "good", max_tokens=1)
        e.complete("ia31", "good", max_tokens=1)
        assert list(e.loaded()) == ["ia30", "ia31"]
        e.complete("ia30", "good", max_tokens=1)           # ia30 becomes the most recently used
        assert list(e.loaded()) == ["ia31", "ia30"]
        e.complete("lora0", "good", max_tokens=1)          # needs room: both (IA)3 deltas go, oldest first
        assert list(e.loaded()) == ["lora0"] and e.used_bytes <= e.cache_bytes
        assert e.metrics.get(e.name, "ia31", "evictions_total") == 1
        assert e.metrics.get(e.name, "ia30", "evictions_total") == 1
        assert e.metrics.get(e.name, "ia30", "cache_hits_total") == 1
        assert e.metrics.get(e.name, "ia30", "cache_misses_total") == 1
        assert e.metrics.get(e.name, "lora0", "load_seconds_total") > 0
        # a delta evicted and loaded again answers exactly as before
        first = e.complete("ia31", "the movie was", max_tokens=4)
        e.complete("lora0", "good", max_tokens=1)
        assert e.complete("ia31", "the movie was", max_tokens=4) == first
        assert e.metrics.get(e.name, "ia31", "evictions_total") >= 1
    finally:
        e.stop()


def test_batched_generation_equals_each_request_alone(gpt2):
    path, deltas = gpt2
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=50)
    try:
        requests = [(d, p, 3 + (i % 4)) for i, (d, p) in
                    enumerate((d, p) for d in [None, *MIXED] for p in PROMPTS)]
        alone = [e.complete(d, p, max_tokens=n) for d, p, n in requests]
        futures = [e.submit_generate(d, [p], max_tokens=n) for d, p, n in requests]
        together = [f.result(60)[0] for f in futures]
        assert together == alone
        # different deltas really answer differently (the test could not pass with routing ignored)
        assert len({a["text"] for a in alone}) > len(PROMPTS)
        assert {a["completion_tokens"] for a in alone} >= {3, 6} or any(a["finish_reason"] == "stop" for a in alone)
    finally:
        e.stop()


def test_batched_classification_equals_each_request_alone(bert):
    path, deltas = bert
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=50)
    try:
        names = [None, "lora0", "ia30", "prompt0", "bitfit0", "pfeiffer0"]
        alone = {(n, i): e.classify(n, [t])[0] for n in names for i, t in enumerate(TEXTS)}
        futures = {(n, i): e.submit_classify(n, [t]) for n in names for i, t in enumerate(TEXTS)}
        for k, f in futures.items():
            got = f.result(60)[0]
            assert got["label"] == alone[k]["label"]
            assert got["scores"] == pytest.approx(alone[k]["scores"], abs=1e-5)
        assert set(alone[(None, 0)]["scores"]) == {"LABEL_0", "LABEL_1"}
        assert len({round(a["scores"]["LABEL_0"], 4) for a in alone.values()}) > len(TEXTS)
    finally:
        e.stop()


def test_hot_add_and_remove_while_serving(gpt2, tmp_path):
    path, deltas = gpt2
    e = Engine(path, None, cache_mb=64, max_wait_ms=20)
    try:
        e.add("lora0", deltas / "lora0")
        ref = e.complete("lora0", "good", max_tokens=4)
        stop = threading.Event()
        errors, answers = [], []

        def client():
            while not stop.is_set():
                try:
                    answers.append(e.complete("lora0", "good", max_tokens=4, timeout=60))
                except Exception as ex:  # any failure for the other delta fails the test
                    errors.append(ex)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for round_ in range(5):
            e.add("ia30", deltas / "ia30")
            assert e.complete("ia30", "good", max_tokens=2)["completion_tokens"] == 2
            e.remove("ia30")
            with pytest.raises(DeltaNotFound):
                e.complete("ia30", "good", max_tokens=2)
        stop.set()
        for t in threads:
            t.join()
        assert not errors and answers and all(a == ref for a in answers)
        assert "ia30" not in e.loaded()
    finally:
        e.stop()


def test_queued_request_for_a_removed_delta_fails_alone(gpt2):
    path, deltas = gpt2
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=200)
    try:
        with e._model_lock:  # hold the worker off so both requests are queued when the delta goes
            a = e.submit_generate("lora0", ["good"], max_tokens=2)
            b = e.submit_generate("ia30", ["good"], max_tokens=2)
            e.remove("ia30")
        assert a.result(30)[0]["completion_tokens"] == 2
        with pytest.raises(DeltaNotFound, match="removed"):
            b.result(30)
    finally:
        e.stop()


def test_a_corrupted_delta_fails_only_its_requests(gpt2, tmp_path):
    path, deltas = gpt2
    broken = tmp_path / "broken"
    shutil.copytree(deltas / "lora1", broken)
    e = Engine(path, None, cache_mb=64, max_wait_ms=100)
    try:
        e.add("lora0", deltas / "lora0")
        e.add("broken", broken)
        data = (broken / "delta.safetensors").read_bytes()
        (broken / "delta.safetensors").write_bytes(data[: len(data) // 2])  # truncated after registration
        futures = [e.submit_generate(n, ["good"], max_tokens=2) for n in ("lora0", "broken", None)]
        assert futures[0].result(30)[0]["completion_tokens"] == 2
        assert futures[2].result(30)[0]["completion_tokens"] == 2
        with pytest.raises(Exception, match="truncated or corrupted"):
            futures[1].result(30)
        assert e.metrics.get(e.name, "broken", "errors_total") == 1
    finally:
        e.stop()


def test_streaming_stop_strings_and_per_row_limits(gpt2):
    path, deltas = gpt2
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=50)
    try:
        full = e.complete("lora1", "the movie was", max_tokens=8)
        pieces = []
        streamed = e.submit_generate("lora1", ["the movie was"], max_tokens=8,
                                     on_text=lambda i, piece: pieces.append(piece))
        short = e.submit_generate("lora1", ["the movie was"], max_tokens=2)
        assert streamed.result(30)[0] == full and "".join(pieces) == full["text"]
        assert short.result(30)[0]["completion_tokens"] == 2 and short.result()[0]["finish_reason"] == "length"
        words = full["text"].split()
        if len(words) >= 3:  # stop at the third word: the text ends before it, the reason is "stop"
            cut = e.complete("lora1", "the movie was", max_tokens=8, stop=[" " + words[2]])
            assert cut["finish_reason"] == "stop" and full["text"].startswith(cut["text"])
            assert " " + words[2] not in cut["text"]
        with pytest.raises(BadRequest, match="max_tokens"):
            e.submit_generate("lora1", ["good"], max_tokens=0)
        with pytest.raises(BadRequest, match="exceeds the model's 64 positions"):
            e.submit_generate("lora1", ["good " * 70], max_tokens=4)
        with pytest.raises(DeltaNotFound):
            e.submit_generate("nope", ["good"])
        with pytest.raises(BadRequest, match="classifier|language model"):
            e.submit_classify(None, ["good"])
        # sampling rows and greedy rows share a batch; the greedy ones stay exactly greedy
        sampled = [e.submit_generate("lora1", ["the movie was"], max_tokens=8, temperature=1.0, top_p=0.9)
                   for _ in range(3)]
        greedy = e.submit_generate("lora1", ["the movie was"], max_tokens=8)
        assert greedy.result(30)[0] == full
        assert all(s.result(30)[0]["completion_tokens"] >= 1 for s in sampled)
    finally:
        e.stop()


def test_seeded_sampling_depends_on_the_seed_alone_not_on_the_batch(gpt2):
    """OpenAI's ``seed``: a sampled request with a seed gives the same text alone and in a batch
    with other (sampled, greedy, other-delta) requests; another seed gives another text."""
    path, deltas = gpt2
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=50)
    try:
        kw = {"max_tokens": 6, "temperature": 1.5}
        alone = e.complete("lora0", "the movie was", seed=7, **kw)
        assert e.complete("lora0", "the movie was", seed=7, **kw) == alone
        futures = [e.submit_generate(d, [p], seed=s, **kw) for d, p, s in
                   [("ia30", "good", None), ("lora0", "the movie was", 7), (None, "bad", 3), ("prompt0", "a", 7)]]
        futures.append(e.submit_generate("lora1", ["hello"], max_tokens=4))  # greedy in a sampling batch
        together = [f.result(60) for f in futures]
        assert together[1][0] == alone
        others = {e.complete("lora0", "the movie was", seed=s, **kw)["text"] for s in range(8, 14)}
        assert len(others | {alone["text"]}) > 1  # the seed matters
        with pytest.raises(BadRequest, match="seed"):
            e.submit_generate("lora0", ["x"], seed=-1)
    finally:
        e.stop()


@pytest.mark.parametrize("rejoin", [True, False])
def test_waiting_requests_join_when_rows_finish_and_resumed_rows_are_unchanged(gpt2, rejoin):
    """max_batch=2: a long request and a short one form the first wave while a third waits. When
    the short one finishes, the wave is cut; the long one resumes beside the waiting one (which so
    is answered long before the long one ends); every answer equals the request alone, also for
    seeded sampling, whose generator carries over. Without rejoin, the third waits for the long."""
    path, deltas = gpt2
    # waves of two: [0 seeded, 1] cut -> [0, 2] cut -> [0, 3 greedy] cut when 0 ends -> [3, 4]
    requests = [("lora0", "the movie was", {"max_tokens": 24, "temperature": 1.3, "seed": 5}),
                ("ia30", "good", {"max_tokens": 2}), ("prompt0", "a", {"max_tokens": 3}),
                ("lora1", "once upon", {"max_tokens": 40}), ("bitfit0", "so", {"max_tokens": 3})]
    ref = Engine(path, deltas, cache_mb=64)
    try:
        alone = [ref.complete(d, p, **kw) for d, p, kw in requests]
    finally:
        ref.stop()
    e = Engine(path, deltas, cache_mb=64, max_batch=2, max_wait_ms=0, start=False, rejoin=rejoin)
    order = []
    futures = []
    for i, (d, p, kw) in enumerate(requests):
        f = e.submit_generate(d, [p], **kw)
        f.add_done_callback(lambda _, i=i: order.append(i))
        futures.append(f)
    e.start()
    try:
        together = [f.result(60)[0] for f in futures]
    finally:
        e.stop()
    assert together == alone
    if rejoin:
        assert e.waves_cut == 3
        assert order.index(2) < order.index(0)   # the waiting short requests did not wait for the long ones
        assert order.index(4) < order.index(3)
    else:
        assert e.waves_cut == 0 and order.index(2) > order.index(0)


def test_the_server_refuses_exactly_the_methods_that_cannot_route():
    """Read from each method's own ``routable``, so a new method is served or refused without an edit here."""
    import unipeft as up
    from unipeft.serving.engine import unroutable_kinds

    kinds = set(unroutable_kinds())
    assert {"freeze", "full", "sparse_ft", "diff_pruning", "new_tokens"} <= kinds
    assert not kinds & {"lora", "ia3", "adapter", "prompt_tuning", "prefix_tuning", "bitfit"}
    assert kinds == {k for k, c in up.METHODS.items() if not c.routable}


def test_classification_batches_split_by_length_and_answers_are_unchanged(bert):
    """Rows of very different lengths run as separate forwards (less padding), never one wider than
    the model's positions, each answer still that of the request alone."""
    path, deltas = bert
    e = Engine(path, deltas, cache_mb=64, max_wait_ms=50, start=False)
    short, long_ = "good", " ".join(["a long and winding review of the film"] * 12)
    jobs_in = [("lora0", short), ("ia30", long_), (None, short), ("prompt0", long_), ("bitfit0", short)]
    try:
        alone = {}
        for d, t in jobs_in:
            probe = Engine(path, deltas, cache_mb=64)
            try:
                alone[(d, t)] = probe.classify(d, [t])
            finally:
                probe.stop()
        futures = [e.submit_classify(d, [t]) for d, t in jobs_in]
        with e._cv:
            queued = list(e._queue)
        # the shorts together; the two long ones apart: side by side they would be 64 tokens + the
        # prompt delta's 2 positions wide, past the tiny BERT's 64 positions
        groups = e._buckets(queued)
        assert sorted(len(g) for g in groups) == [1, 1, 3]
        e.bucket_overhead = 10 ** 9   # a forward costs more than any padding: only the width splits
        assert sorted(len(g) for g in e._buckets(queued)) == [1, 4]
        e.bucket_overhead = 64
        e.start()
        for f, k in zip(futures, jobs_in):
            got, want = f.result(60)[0], alone[k][0]
            assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        assert e.batches == 1  # one batch taken from the queue, run as three forwards
    finally:
        e.stop()


def test_a_base_served_in_half_precision_serves_the_deltas_saved_from_its_float32_weights(bert):
    """Deltas are trained on float32 weights and served on a bfloat16 or float16 copy: the engine finds them
    in its folder (scan) and answers as the float32 engine does, to that precision."""
    import torch
    from transformers import AutoTokenizer

    from test_serving_common import load_model
    from unipeft import UnipeftError

    path, deltas = bert
    full = Engine(path, deltas, cache_mb=64)
    half = Engine(path, deltas, cache_mb=64, dtype="bf16")   # unipeft serve --dtype bf16
    obj = Engine((load_model(path).to(torch.float16), AutoTokenizer.from_pretrained(path)), deltas, cache_mb=64)
    try:
        assert half.model.dtype == torch.bfloat16 and obj.model.dtype == torch.float16
        assert half.known() == full.known() == obj.known() == sorted(["lora0", "ia30", "prompt0", "bitfit0",
                                                                       "pfeiffer0"])
        for name in [None, *half.known()]:
            want = full.classify(name, TEXTS)[0]["scores"]
            assert half.classify(name, TEXTS)[0]["scores"] == pytest.approx(want, abs=0.03), name
            assert obj.classify(name, TEXTS)[0]["scores"] == pytest.approx(want, abs=0.01), name
    finally:
        for e in (full, half, obj):
            e.stop()
    with pytest.raises(UnipeftError, match="dtype 'int8' is not a serving precision; valid: 'fp32', 'bf16'"):
        Engine(path, deltas, dtype="int8")
