"""The serving engine: one base model in memory, many deltas, requests batched across deltas.

    engine = Engine("path/to/base", "deltas/", cache_mb=64)
    engine.classify("sst2", ["a great film"])          # -> [{"label": ..., "scores": {...}}]
    engine.complete("e2e", "name = Alpha", max_tokens=8)  # -> {"text": ..., "finish_reason": ...}

Deltas are the folders ``up.save`` writes (the folder name is the delta's name). They are
loaded on first use and kept in a cache sized in **bytes** (the sum of a delta's tensors): an
(IA)3 delta is kilobytes and a LoRA megabytes, so a cache that counted slots would waste the
small ones. When a load would pass the budget, the least recently used deltas are detached.
``dtype="bf16"`` (or ``"fp16"``) serves the base at half precision; deltas saved from its float32
weights are the same base's deltas (``storage.same_base``) and serve on it unchanged.

One worker thread owns the model. Requests arriving together (within ``max_wait_ms`` of the
first, up to ``max_batch`` rows) become one batch, each row routed to its own delta with
``up.route``; the worker loads what the batch needs, runs it, answers, then evicts down to the
budget. Every change to the model (load, evict, remove, validating an upload) takes the same
lock as a running batch, so a delta is never detached under a batch that uses it, and adding or
removing deltas while serving never fails a request for another delta. Should a batch fail as a
whole (a bug, an input one delta cannot take), each of its requests runs again alone, so only
the request at fault gets the error.

Continuous batching: generation runs as *waves* (one ``generate`` call over a batch). A row that
finishes (its own ``max_tokens``, a stop string, end of sequence) is answered at once (its stream
closes then). When rows have finished while requests wait, the wave is cut at that step (at
least a quarter of its rows done, and more than two tokens left to some row): the unfinished
rows, each with its tokens so far, go back to the front of the queue and resume in the next
wave together with the waiting requests, so a request never waits for a long one to end. A
resumed row runs its prompt and its tokens so far as one prompt (vLLM's "recompute"
preemption): its next tokens are those it would have produced (a seeded row keeps drawing from
its own generator), while the KV caches of different rows never have to be merged, which would
tie the engine to one cache layout and to the routed prompt-tuning layout of each step.
``rejoin=False`` runs every wave to its end.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .. import storage
from ..config import METHODS, MethodConfig
from ..engine import detach, registry
from ..errors import UnipeftError, choices
from ..routing import route
from . import batch as B
from .base_model import cast_base, load_base, max_positions, pad_id
from .metrics import Metrics

# a delta's name, optionally "tenant/name": letters, digits, '_' and '-', never a path
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
KEY = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def unroutable_kinds() -> list[str]:
    """Methods that cannot route per example (they change the base's own weights in place, or its
    vocabulary): the server refuses them at upload, as the method itself declares."""
    return sorted(k for k, c in METHODS.items() if not c.routable)


class DeltaNotFound(UnipeftError):
    """No delta of that name (the HTTP layer answers 404)."""


class BadRequest(UnipeftError):
    """A request the engine cannot run as given (the HTTP layer answers 400)."""


@dataclasses.dataclass
class _Known:
    path: Path
    method: str
    positions: int         # extra input positions the delta puts in front (prompt tuning's length)


@dataclasses.dataclass
class _Loaded:
    internal: str          # the name it is attached under ("_d17": public names may hold '/')
    nbytes: int


@dataclasses.dataclass
class _Job:
    kind: str                              # "classify" or "generate"
    delta: str | None                      # public name; None: the base
    rows: list[dict[str, list[int]]]       # tokenised inputs, one per row
    future: concurrent.futures.Future
    t0: float
    gen: list[B.Row] = dataclasses.field(default_factory=list)   # generation: one per row
    temperature: float = 0.0
    top_p: float = 1.0
    root: "_Job | None" = None             # a resumed wave's job: the request it continues (answered as a whole)


class Engine:
    """One base model serving many deltas; see the module docstring."""

    def __init__(self, base, deltas_dir=None, cache_mb: float = 256, *, tokenizer=None, name: str | None = None,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_new_tokens: int = 512,
                 metrics: Metrics | None = None, start: bool = True, rejoin: bool = True,
                 bucket_overhead: int = 64, dtype: str | None = None):
        model, tok, default_name = load_base(base, tokenizer)
        model = cast_base(model, dtype)  # "bf16" / "fp16": half the memory; deltas saved in float32 still serve
        if cache_mb <= 0 or max_batch < 1 or max_wait_ms < 0:
            raise UnipeftError(f"Engine: cache_mb must be > 0, max_batch >= 1, max_wait_ms >= 0 "
                               f"(got {cache_mb}, {max_batch}, {max_wait_ms})")
        self.model, self.tokenizer = model.eval(), tok
        self.name = name or default_name
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnipeftError(f"Engine: {type(model).__name__} is an encoder-decoder model; serving takes "
                               f"decoder-only language models (completions) and sequence classifiers (classify)")
        self.kind = "generate" if model.can_generate() else "classify"
        if self.kind == "classify" and not hasattr(model.config, "id2label"):
            raise UnipeftError(f"Engine: {type(model).__name__} neither generates nor classifies")
        self.labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)] \
            if self.kind == "classify" else []
        self.identity = storage.base_identity(model)  # what a delta's file must match (storage.same_base)
        self.fingerprint = self.identity["fingerprint"]
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_new_tokens = max_new_tokens
        self.rejoin = rejoin                   # cut a wave for waiting requests once rows have finished
        self.bucket_overhead = bucket_overhead  # classification: one more forward costs this many tokens
        self.waves_cut = 0
        self.max_positions = max_positions(model, tok)
        self.pad_id = pad_id(tok, model)
        eos = model.generation_config.eos_token_id if self.kind == "generate" else None
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.metrics = metrics or Metrics()
        self._known: dict[str, _Known] = {}
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()  # LRU order: oldest first
        self._used = 0
        self._serial = 0
        self._model_lock = threading.RLock()   # the model: batches, loads, evictions, removals, validation
        self._cv = threading.Condition()        # the queue
        # encoding with truncation settings mutates a fast tokenizer: one caller thread at a time
        self._tok_lock = threading.Lock()
        self._queue: collections.deque[_Job] = collections.deque()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.batches = self.batch_rows = 0     # how full the batches are: rows / batches
        self._free_since = 0.0                  # when the worker finished its last batch
        if deltas_dir is not None:
            self.scan(deltas_dir)
        if start:
            self.start()

    # ------------------------------------------------------------------ deltas
    def scan(self, deltas_dir) -> list[str]:
        """Register every delta folder in ``deltas_dir`` written for this base; returns their names.
        Folders for another base (a different fingerprint) and hidden folders are skipped."""
        found = []
        root = Path(deltas_dir)
        if not root.is_dir():
            raise UnipeftError(f"deltas directory {str(root)!r} does not exist")
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not (d / storage.JSON_NAME).is_file() or not NAME.match(d.name):
                continue
            meta = storage.read_meta(d)
            if self.serves_base_of(meta):
                self.add(d.name, d, meta=meta)
                found.append(d.name)
        return found

    def add(self, key: str, path, meta: dict | None = None) -> None:
        """Make delta ``key`` (a folder written by ``up.save``) servable; it loads on first use.
        Adding a name that exists replaces it (the old one is detached once no batch uses it)."""
        if not KEY.match(key):
            raise BadRequest(f"delta name {key!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
                             f"(starting with a letter or digit)")
        path = Path(path)
        meta = meta or storage.read_meta(path)
        if not self.serves_base_of(meta):
            raise BadRequest(f"delta {key!r} was saved for another base (fingerprint "
                             f"{meta['base'].get('fingerprint')}); this engine serves {self.name} "
                             f"(fingerprint {self.fingerprint})")
        kind = meta["method"].get("kind")
        options = meta["method"].get("options") or {}
        with self._model_lock:
            if key in self._known:
                self._unload(key, evicted=False)
            self._known[key] = _Known(path, kind, int(options.get("length", 0)) if kind == "prompt_tuning" else 0)

    def serves_base_of(self, meta: dict) -> bool:
        """Whether a delta described by ``meta`` (its delta.json) was saved for this engine's base, at any
        precision (a delta trained on float32 weights serves on their bfloat16 copy)."""
        return storage.same_base(meta.get("base") or {}, self.identity)

    def remove(self, key: str) -> None:
        """Stop serving ``key``: waits for a running batch, detaches it, fails its queued requests
        with DeltaNotFound. Requests for other deltas are untouched."""
        with self._model_lock:
            if key not in self._known:
                raise DeltaNotFound(f"no delta named {key!r}")
            del self._known[key]
            self._unload(key, evicted=False)

    def known(self) -> list[str]:
        with self._model_lock:
            return sorted(self._known)

    def has(self, key: str) -> bool:
        return key in self._known

    def loaded(self) -> dict[str, int]:
        """Deltas in the cache now (least recently used first) and their bytes."""
        with self._model_lock:
            return {k: v.nbytes for k, v in self._loaded.items()}

    @property
    def used_bytes(self) -> int:
        return self._used

    def _read(self, path: Path) -> tuple[dict, MethodConfig, dict[str, torch.Tensor]]:
        meta = storage.read_meta(path)
        tensors = storage._read_tensors(path / storage.TENSORS_NAME)
        if set(tensors) != set(meta.get("tensors", tensors)):
            raise BadRequest("delta.json and delta.safetensors disagree about which tensors the delta holds")
        m = meta["method"]
        if not isinstance(m, dict) or not isinstance(m.get("options"), dict) or "kind" not in m:
            raise BadRequest("delta.json is corrupted: bad 'method' field")
        return meta, MethodConfig.from_dict(m["kind"], m["options"]), tensors

    def _attach(self, path: Path) -> tuple[str, int]:
        """Attach the delta at ``path`` (switched off) under a fresh internal name; (name, bytes)."""
        meta, config, tensors = self._read(path)
        if not self.serves_base_of(meta):
            raise BadRequest(f"{path.name}: saved for another base (fingerprint {meta['base'].get('fingerprint')}, "
                             f"served {self.fingerprint})")
        self._serial += 1
        internal = f"_d{self._serial}"   # public names never start with '_', so never collide
        storage.attach_with_tensors(self.model, config, internal, tensors, activate=False, tokenizer=self.tokenizer)
        return internal, sum(t.numel() * t.element_size() for t in tensors.values())

    def _ensure_loaded(self, key: str, pinned: set[str]) -> str:
        """The internal name of ``key``, loading it first (and evicting unpinned LRU deltas)."""
        hit = self._loaded.get(key)
        if hit is not None:
            self._loaded.move_to_end(key)
            self.metrics.add(self.name, key, cache_hits_total=1)
            return hit.internal
        known = self._known.get(key)
        if known is None:
            raise DeltaNotFound(f"delta {key!r} was removed")
        t = time.perf_counter()
        internal, nbytes = self._attach(known.path)
        self._loaded[key] = _Loaded(internal, nbytes)
        self._used += nbytes
        self.metrics.add(self.name, key, cache_misses_total=1, load_seconds_total=time.perf_counter() - t)
        self._evict(pinned | {key})
        return internal

    def _evict(self, pinned: set[str]) -> None:
        """Detach least recently used deltas until the cache fits its budget; pinned ones (the
        running batch's) stay even if that means going over until the batch ends."""
        for key in list(self._loaded):
            if self._used <= self.cache_bytes:
                break
            if key not in pinned:
                self._unload(key, evicted=True)

    def _unload(self, key: str, evicted: bool) -> None:
        entry = self._loaded.pop(key, None)
        if entry is None:
            return
        detach(self.model, entry.internal)
        self._used -= entry.nbytes
        if evicted:
            self.metrics.add(self.name, key, evictions_total=1)

    @contextlib.contextmanager
    def trial(self, path) -> tuple[str, dict]:
        """Attach the delta at ``path`` for a check and detach it after (uploads are validated
        this way before they are stored). Yields (internal name, meta)."""
        path = Path(path)
        with self._model_lock:
            internal, _ = self._attach(path)
            try:
                yield internal, storage.read_meta(path)
            finally:
                detach(self.model, internal)

    def changes_output(self, internal: str, meta: dict) -> bool:
        """Whether an attached delta changes the model's output on a probe input (routed, as it
        would be served): a delta that changes nothing is refused at upload."""
        if meta["method"].get("kind") in unroutable_kinds():
            raise BadRequest(f"method {meta['method'].get('kind')!r} cannot route per example (it changes the base "
                             f"model's own weights or vocabulary), so it cannot be served per request beside other "
                             f"deltas; servable methods: {choices(sorted(set(METHODS) - set(unroutable_kinds())))}")
        ids = torch.arange(3, 3 + min(8, self.tokenizer.vocab_size - 3)).unsqueeze(0) % self.model.config.vocab_size
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad(), self._model_lock:
            with route(self.model, [None, internal]):
                out = self.model(**{k: v.repeat(2, 1) for k, v in inputs.items()}).logits
        return not torch.equal(out[0], out[1])

    # ------------------------------------------------------------------ requests
    def _check_delta(self, delta: str | None) -> None:
        if delta is not None and delta not in self._known:
            raise DeltaNotFound(f"no delta named {delta!r}; deltas of {self.name}: {choices(self.known()[:20])}")

    def submit_classify(self, delta: str | None, inputs: list) -> concurrent.futures.Future:
        """Classify texts (or [a, b] pairs) with ``delta`` (None: the base); a future of one
        ``{"label", "scores", "prompt_tokens"}`` per input."""
        if self.kind != "classify":
            raise BadRequest(f"{self.name} is a language model: use completions, not classify")
        self._check_delta(delta)
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("input must be a non-empty list of texts or [text, text] pairs")
        known = self._known.get(delta) if delta is not None else None
        room = self.max_positions - (known.positions if known is not None else 0)  # a prompt's positions come first
        rows = []
        for x in inputs:
            if not (isinstance(x, str) or isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x)):
                raise BadRequest(f"each input must be a text or a [text, text] pair; got {str(x)[:60]!r}")
            with self._tok_lock:
                enc = self.tokenizer(*([x] if isinstance(x, str) else x), truncation=True, max_length=room)
            rows.append({k: list(v) for k, v in enc.items()})
        return self._put(_Job("classify", delta, rows, concurrent.futures.Future(), time.perf_counter()))

    def submit_generate(self, delta: str | None, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                        top_p: float = 1.0, stop: list[str] | None = None,
                        on_text: Callable[[int, str], None] | None = None,
                        seed: int | None = None) -> concurrent.futures.Future:
        """Complete each prompt with ``delta`` (None: the base); greedy at temperature 0. A future of
        one ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`` per prompt;
        ``on_text(i, piece)`` streams prompt i's text as it is generated (from the worker thread).
        With ``seed``, sampling is reproducible: the same request and seed give the same text,
        whatever else shares its batch (prompt i of a request draws with seed + i)."""
        if self.kind != "generate":
            raise BadRequest(f"{self.name} is a classifier: use classify, not completions")
        self._check_delta(delta)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_new_tokens:
            raise BadRequest(f"max_tokens must be an integer from 1 to {self.max_new_tokens}; got {max_tokens!r}")
        if not 0 <= temperature <= 10 or not 0 < top_p <= 1:
            raise BadRequest(f"temperature must be in [0, 10] and top_p in (0, 1]; got {temperature}, {top_p}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise BadRequest(f"seed must be an integer from 0 to 2**63 - 1; got {seed!r}")
        stop = list(stop or [])
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of at most 4 of them")
        known = self._known.get(delta) if delta is not None else None
        if delta is not None and known is None:   # removed since _check_delta
            raise DeltaNotFound(f"no delta named {delta!r}")
        extra = known.positions if known is not None else 0
        rows, gen = [], []
        for i, p in enumerate(prompts):
            with self._tok_lock:
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            if not ids:
                ids = [next(iter(self.eos))] if self.eos else [self.pad_id]  # an empty prompt starts from <eos>
            if len(ids) + extra + max_tokens > self.max_positions:
                raise BadRequest(f"prompt of {len(ids)} tokens + max_tokens {max_tokens}"
                                 f"{f' + {extra} prompt-tuning positions' if extra else ''} exceeds the model's "
                                 f"{self.max_positions} positions")
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            cb = None if on_text is None else (lambda piece, i=i: on_text(i, piece))
            gen.append(B.Row(max_tokens, stop, cb, None if seed is None else (seed + i) % 2 ** 63))
            gen[-1].prompt = ids
        return self._put(_Job("generate", delta, rows, concurrent.futures.Future(), time.perf_counter(), gen,
                              float(temperature), float(top_p)))

    def classify(self, delta: str | None, inputs: list, timeout: float | None = None) -> list[dict]:
        return self.submit_classify(delta, inputs).result(timeout)

    def complete(self, delta: str | None, prompt: str, timeout: float | None = None, **kw) -> dict:
        return self.submit_generate(delta, [prompt], **kw).result(timeout)[0]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for chat messages: the tokenizer's chat template, or "role: content" lines
        ending with "assistant:" for a tokenizer without one."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("messages must be a non-empty list of {\"role\": str, \"content\": str}")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False,
                add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _put(self, job: _Job) -> concurrent.futures.Future:
        with self._cv:
            if self._stopped:
                raise UnipeftError(f"engine {self.name} is stopped")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # ------------------------------------------------------------------ the worker
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"unipeft-engine-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, fail what is still queued, stop the worker."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            while self._queue:
                self._queue.popleft().future.set_exception(UnipeftError(f"engine {self.name} stopped"))

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def _take(self) -> list[_Job]:
        """The next batch: waits for a request, then up to ``max_wait`` for more (up to
        ``max_batch`` rows). A request with more rows than that runs as a batch of its own."""
        with self._cv:
            while not self._queue and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return []
            # wait from the later of the first arrival and the end of the previous batch: under load,
            # the clients just answered resubmit within that wait and the batch fills, where a
            # deadline from the first arrival alone settles into two half-full batches taking turns
            deadline = max(self._queue[0].t0, self._free_since) + self.max_wait
            while sum(len(j.rows) for j in self._queue) < self.max_batch and not self._stopped:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs, rows = [], 0
            while self._queue and (not jobs or rows + len(self._queue[0].rows) <= self.max_batch):
                rows += len(self._queue[0].rows)
                jobs.append(self._queue.popleft())
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            self._run(jobs)
            self._free_since = time.perf_counter()

    def _run(self, jobs: list[_Job]) -> None:
        """Load what the batch needs, run it, answer; on a failure of the whole batch run each
        request alone so only the one at fault fails."""
        with self._model_lock:
            pinned = {j.delta for j in jobs if j.delta is not None}
            names: dict[str | None, str | None] = {None: None}
            ready = []
            for j in jobs:
                if j.delta not in names:
                    try:
                        names[j.delta] = self._ensure_loaded(j.delta, pinned)
                    except Exception as e:  # a removed, corrupted or unreadable delta fails its own requests only
                        names[j.delta] = e
                if isinstance(names[j.delta], Exception):
                    self._fail(j, names[j.delta])
                else:
                    ready.append(j)
            try:
                if ready:
                    self.batches += 1
                    self.batch_rows += sum(len(j.rows) for j in ready)
                    answers = {}
                    for group in self._buckets(ready):  # classification: rows of similar length together
                        for j, a in zip(group, self._forward(group, [names[j.delta] for j in group])):
                            answers[id(j)] = a
                    for j, a in ((j, answers[id(j)]) for j in ready):
                        if a is not None and not j.future.done():   # None: carried into the next wave
                            self._answer(j.root or j, a)
            except Exception as e:
                if len(ready) == 1:
                    self._fail(ready[0], e)
                else:
                    for j in ready:
                        if not j.future.done():
                            self._run([j])
            finally:
                with self._cv:  # deltas of rows carried into the next wave stay loaded
                    carried = {j.delta for j in self._queue if j.root is not None and j.delta is not None}
                self._evict(carried)

    def _buckets(self, jobs: list[_Job]) -> list[list[_Job]]:
        """A classification batch split into forwards of similar length (``batch.buckets``): padding
        is work on a CPU. Generation is never split: its decode steps gain more from a wide batch
        than they lose to the prompts' padding."""
        if self.kind != "classify" or len(jobs) < 2:
            return [jobs]

        def sizes(j):
            known = self._known.get(j.delta) if j.delta is not None else None
            return max(len(r["input_ids"]) for r in j.rows), (known.positions if known is not None else 0), len(j.rows)

        order = sorted(jobs, key=lambda j: sum(sizes(j)[:2]))
        return [[order[i] for i in group] for group in
                B.buckets([sizes(j) for j in order], self.max_positions, self.bucket_overhead)]

    def _forward(self, jobs: list[_Job], internal: list[str | None]) -> list[list[dict] | None]:
        """Answers per job (None for a job carried into the next wave)."""
        if self.kind == "classify":
            rows = [r for j in jobs for r in j.rows]
        else:  # a row resumes from its prompt and its tokens so far (none yet in its first wave)
            rows = [{"input_ids": r.prompt + r.ids, "attention_mask": [1] * (len(r.prompt) + len(r.ids))}
                    for j in jobs for r in j.gen]
        routed = [n for j, n in zip(jobs, internal) for _ in (j.rows if self.kind == "classify" else j.gen)]
        ctx = route(self.model, routed) if registry(self.model) is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            if self.kind == "classify":
                probs = self.model(**B.pad(rows, self.pad_id, left=False)).logits.float().softmax(-1).tolist()
                out, i = [], 0
                for j in jobs:
                    out.append([{**self._label(p), "prompt_tokens": len(r["input_ids"])}
                                for p, r in zip(probs[i:i + len(j.rows)], j.rows)])
                    i += len(j.rows)
                return out
            return self._generate(jobs, rows)

    def _label(self, probs: list[float]) -> dict:
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": self.labels[best], "scores": {lab: p for lab, p in zip(self.labels, probs)}}

    def _generate(self, jobs: list[_Job], rows: list[dict]) -> list[list[dict] | None]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        batch = B.pad(rows, self.pad_id, left=True)
        gen_rows = [r for j in jobs for r in j.gen]
        temps = [j.temperature for j in jobs for _ in j.gen]
        sample = any(t > 0 for t in temps)
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens - len(r.ids) for r in gen_rows), do_sample=sample, num_beams=1,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos) or None,
            # sampling is done per row by RowSampling; the library's own warpers stay off
            **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}))
        processors = LogitsProcessorList(
            [B.RowSampling(temps, [j.top_p for j in jobs for _ in j.gen], [r.generator for r in gen_rows])]
            if sample else [])
        for j in jobs:
            root = j.root or j
            for r in j.gen:
                # a request whose rows are all done is answered at once, not when the whole batch ends
                r.on_done = (lambda root=root: self._answer(root, self._result(root))
                             if all(x.finish for x in root.gen) and not root.future.done() else None)
        stops = B.RowStops(gen_rows, self.tokenizer, self.eos, cut=self._cut if self.rejoin else None)
        self.model.generate(**batch, generation_config=config, logits_processor=processors,
                            stopping_criteria=StoppingCriteriaList([stops]))
        if stops.cut_short:
            self.waves_cut += 1
            carried = []
            for j in jobs:
                root = j.root or j
                left = [(x, r) for x, r in zip(root.rows, root.gen) if r.finish is None]
                if left and not root.future.done():
                    carried.append(_Job("generate", j.delta, [x for x, _ in left], root.future, root.t0,
                                        [r for _, r in left], j.temperature, j.top_p, root=root))
            with self._cv:
                self._queue.extendleft(reversed(carried))   # first in the next wave, in their order
                self._cv.notify_all()
        return [self._result(j.root or j) if all(r.finish for r in (j.root or j).gen) else None for j in jobs]

    def _cut(self, rows: list[B.Row]) -> bool:
        """End the running wave now? When requests wait, at least a quarter of its rows are done
        and some row has more than two tokens to go (resuming costs a prompt pass per row left)."""
        done = sum(r.finish is not None for r in rows)
        return bool(self._queue) and 4 * done >= len(rows) and \
            max((r.max_tokens - len(r.ids) for r in rows if r.finish is None), default=0) > 2

    @staticmethod
    def _result(job: _Job) -> list[dict]:
        return [{"text": r.text, "finish_reason": r.finish or "length", "prompt_tokens": len(x["input_ids"]),
                 "completion_tokens": len(r.ids)} for r, x in zip(job.gen, job.rows)]

    def _answer(self, job: _Job, answer: list[dict]) -> None:
        key = job.delta if job.delta is not None else self.name
        prompt = sum(len(r["input_ids"]) for r in job.rows)
        completion = sum(a.get("completion_tokens", 0) for a in answer)
        self.metrics.add(self.name, key, requests_total=1, prompt_tokens_total=prompt,
                         completion_tokens_total=completion)
        self.metrics.observe_latency(self.name, key, time.perf_counter() - job.t0)
        job.future.set_result(answer)

    def _fail(self, job: _Job, error: Exception) -> None:
        self.metrics.add(self.name, job.delta if job.delta is not None else self.name, errors_total=1)
        if not job.future.done():
            job.future.set_exception(error)

    def gauges(self) -> dict[str, float]:
        return {"cache_bytes": self._used, "cache_capacity_bytes": self.cache_bytes,
                "deltas_loaded": len(self._loaded), "deltas_known": len(self._known), "queue_depth": self.queued(),
                "batches": self.batches, "batch_rows": self.batch_rows}
