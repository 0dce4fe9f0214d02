"""The HTTP server: an OpenAI-compatible API over one or more engines, with tenants and uploads.

    app = create_app([Engine("base/")], "deltas/", admin_key="...")   # then uvicorn.run(app)

Endpoints (JSON; keys as ``Authorization: Bearer <key>``; every error is
``{"error": {"message", "type", "code"}}`` with a 4xx status naming the problem):

* ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's shapes; ``model`` names a
  delta or a base; greedy when ``temperature`` is 0 (the default here); server-sent events
  when ``stream`` is true.
* ``POST /v1/classify``: ``{"model", "input": [text | [a, b], ...]}`` ->
  ``{"data": [{"label", "scores": {label: p}}], "usage": {"prompt_tokens", "total_tokens"}}``.
* Sampling with ``seed`` is reproducible per request, whatever shares its batch.
* ``GET /v1/models``: the bases and the deltas this key may use.
* ``POST /v1/deltas`` (multipart upload, see ``uploads.py``), ``DELETE /v1/deltas/{name}``.
* ``POST/GET /v1/tenants``, ``DELETE /v1/tenants/{name}``, ``POST /v1/tenants/{name}/keys``: admin.
* ``GET /healthz`` (no key), ``GET /metrics`` (Prometheus text; the admin's, as it names every
  tenant's deltas).

Who sees what: the admin key reaches every delta (a tenant's as ``tenant/name``); a tenant's key
reaches its own deltas by name and the bases. Another tenant's delta answers 404 with the same
message as a delta that does not exist, so its existence never leaks. Without an admin key the
server runs as a developer's local default: no key is needed (a tenant's key still narrows the
view to that tenant) and ``cli.py`` refuses any address but loopback.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import storage
from ..errors import UnipeftError, choices
from .engine import NAME, BadRequest, DeltaNotFound, Engine
from .store import STATE_DIR, TENANTS_DIR, Store, db_path, hash_key
from .uploads import HTTPError, prepare, read_multipart
from .uploads import store as store_files

log = logging.getLogger("unipeft.serving")
MAX_JSON_BODY = 4 << 20
MAX_PROMPTS = 64
NOT_FOUND = "model not found (it was removed); GET /v1/models lists the models this key may use"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
               415: "unsupported_media_type", 500: "server_error", 503: "unavailable"}


class Server:
    """The state behind the app: engines by base name, the registry, the deltas directory."""

    def __init__(self, engines: list[Engine], deltas_dir, admin_key: str | None = None, max_upload_mb: float = 256):
        if not engines:
            raise UnipeftError("the server needs at least one base model")
        self.engines = {e.name: e for e in engines}
        if len(self.engines) != len(engines):
            raise UnipeftError(f"two bases share a name: {[e.name for e in engines]}; give each engine a name=")
        self.metrics = engines[0].metrics
        for e in engines:
            e.metrics = self.metrics   # one /metrics page for every base
        self.dir = Path(deltas_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scratch = self.dir / STATE_DIR / "scratch"
        self.store = Store(db_path(self.dir))
        self.admin_hash = hash_key(admin_key) if admin_key else None
        self.max_upload = int(max_upload_mb * 2 ** 20)
        self._lock = threading.Lock()   # uploads and deletes: name checks and the writes they guard
        self.sync()

    # ------------------------------------------------------------------ start-up
    def sync(self) -> None:
        """Register what is on disk: the admin's folders in the deltas directory (added, removed or
        changed while the server was down), the tenants' recorded uploads; drop leftovers."""
        # temporary folders of uploads and deletes cut short by a crash (an hour old: not a replica's)
        leftovers = list(self.scratch.glob("*")) + list(self.dir.glob(".*.tmp-*")) + \
            list((self.dir / TENANTS_DIR).glob("*/.*.tmp-*"))
        for d in leftovers:
            if time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
        seen = set()
        for d in sorted(self.dir.iterdir()):
            if d.name.startswith(".") or not (d / storage.JSON_NAME).is_file():
                continue
            if not NAME.match(d.name) or d.name in self.engines:
                log.warning("skipping delta folder %s: its name is not a valid delta name or is a base's", d)
                continue
            try:
                meta = storage.read_meta(d)
            except UnipeftError as e:
                log.warning("skipping delta folder %s: %s", d, e)
                continue
            engine = self._engine_for(meta)
            if engine is None:
                log.warning("skipping delta folder %s: saved for a base that is not served", d)
                continue
            engine.add(d.name, d, meta=meta)
            self.store.add_delta("", d.name, engine.name, d, meta["method"].get("kind", "?"), _size(d))
            seen.add(d.name)
        recorded = set()
        for row in self.store.deltas():
            if row["owner"] == "":
                if row["name"] not in seen:
                    self.store.remove_delta("", row["name"])
                continue
            path, engine = Path(row["path"]), self.engines.get(row["base"])
            if engine is None or not (path / storage.JSON_NAME).is_file():
                log.warning("tenant %s's delta %s is gone from disk or its base is not served; dropped",
                            row["owner"], row["name"])
                self.store.remove_delta(row["owner"], row["name"])
                continue
            engine.add(f"{row['owner']}/{row['name']}", path)
            recorded.add(path.resolve())
        tenants_dir = self.dir / TENANTS_DIR
        for d in tenants_dir.glob("*/*") if tenants_dir.is_dir() else ():
            # an upload killed before it was recorded was never acknowledged; the age test spares an
            # upload that a replica sharing this directory is recording right now
            if d.resolve() not in recorded and time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)

    def _engine_for(self, meta: dict) -> Engine | None:
        return next((e for e in self.engines.values() if e.serves_base_of(meta)), None)

    # ------------------------------------------------------------------ callers
    def caller(self, request) -> str | None:
        """The tenant the request acts for, or None for the admin; 401 for a missing or wrong key."""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if self.admin_hash is None:   # local default: keys are optional; a tenant's key narrows the view
            return self.store.tenant_for_key(key) if key else None
        if not key:
            raise HTTPError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if hmac.compare_digest(hash_key(key), self.admin_hash):
            return None
        tenant = self.store.tenant_for_key(key)
        if tenant is None:
            raise HTTPError(401, "invalid API key")
        return tenant

    def admin_only(self, tenant: str | None, what: str) -> None:
        if tenant is not None:
            raise HTTPError(403, f"{what} needs the admin key")

    def owner_name(self, tenant: str | None, model: str) -> tuple[str, str]:
        """(owner, name) a caller means by ``model``: a tenant's own names; the admin's, or a
        tenant's as ``tenant/name`` for the admin."""
        if tenant is not None:
            return tenant, model
        owner, _, name = model.rpartition("/")
        return owner, name

    def resolve(self, tenant: str | None, model) -> tuple[Engine, str | None]:
        """(engine, delta key or None for the base) for a request's ``model``; 404 if the caller
        cannot see it (the same answer whether it exists for someone else or not at all)."""
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "field 'model' is required: the name of a delta or a base (GET /v1/models)")
        if model in self.engines:
            return self.engines[model], None
        owner, name = self.owner_name(tenant, model)
        row = self.store.delta(owner, name) if NAME.match(name) else None
        if row is None or row["base"] not in self.engines:
            raise HTTPError(404, f"model {model!r} does not exist or this key cannot use it; GET /v1/models lists "
                                 f"the models this key may use")
        engine, key = self.engines[row["base"]], name if owner == "" else f"{owner}/{name}"
        if not engine.has(key) and self._lock.acquire(blocking=False):
            # recorded by another process sharing this registry (a replica): serve it too. Under the
            # upload/delete lock, and only if still recorded, so a delete in progress here is not undone
            try:
                row = self.store.delta(owner, name)
                if row is not None and (Path(row["path"]) / storage.JSON_NAME).is_file():
                    engine.add(key, row["path"])
            finally:
                self._lock.release()
        return engine, key

    def models(self, tenant: str | None) -> list[dict]:
        out = [{"id": e.name, "object": "model", "created": 0, "owned_by": "unipeft", "kind": e.kind,
                "base": e.name} for e in self.engines.values()]
        for r in self.store.deltas(tenant) if tenant is not None else self.store.deltas():
            if r["base"] not in self.engines:
                continue
            public = r["name"] if (tenant is not None or r["owner"] == "") else f"{r['owner']}/{r['name']}"
            out.append({"id": public, "object": "model", "created": int(r["created"]),
                        "owned_by": r["owner"] or "admin", "kind": self.engines[r["base"]].kind, "base": r["base"],
                        "method": r["method"], "bytes": r["bytes"]})
        return out

    # ------------------------------------------------------------------ deltas
    def target(self, owner: str, name: str) -> Path:
        return self.dir / name if owner == "" else self.dir / TENANTS_DIR / owner / name

    def upload(self, tenant: str | None, fields: dict, files: dict) -> dict:
        plan = prepare(files, fields, self.engines)   # every check that needs no model, first
        owner, name, engine = tenant or "", plan["name"], plan["engine"]
        if name in self.engines:
            raise HTTPError(409, f"{name!r} is the name of a served base; choose another delta name")
        with self._lock:
            target = self.target(owner, name)
            if self.store.delta(owner, name) is not None or target.exists():
                raise HTTPError(409, f"delta {name!r} exists already; DELETE /v1/deltas/{name} first to replace it")
            nbytes = store_files(plan, files, target, self.scratch)
            self.store.add_delta(owner, name, engine.name, target, plan["method"], nbytes)
            engine.add(name if owner == "" else f"{owner}/{name}", target)
        public = name if tenant is not None or owner == "" else f"{owner}/{name}"
        return {"id": public, "object": "model", "base": engine.name, "method": plan["method"], "bytes": nbytes}

    def delete(self, tenant: str | None, model: str) -> dict:
        owner, name = self.owner_name(tenant, model)
        with self._lock:
            row = self.store.delta(owner, name) if NAME.match(name) else None
            if row is None:
                raise HTTPError(404, f"model {model!r} does not exist or this key cannot use it")
            self._drop(row)
        return {"id": model, "object": "model", "deleted": True}

    def _drop(self, row: dict) -> None:
        """Stop serving (waits for a batch using it), move the folder aside, forget it, delete it:
        a crash at any point leaves either the delta or nothing, never half of one."""
        key = row["name"] if row["owner"] == "" else f"{row['owner']}/{row['name']}"
        engine = self.engines.get(row["base"])
        if engine is not None and engine.has(key):
            engine.remove(key)
        path = Path(row["path"])
        self.scratch.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.scratch))
        if path.exists():
            path.replace(trash / "delta")
        self.store.remove_delta(row["owner"], row["name"])
        shutil.rmtree(trash, ignore_errors=True)

    def remove_tenant(self, name: str) -> dict:
        with self._lock:
            rows = [r for r in self.store.deltas(name)]
            for r in rows:
                self._drop(r)
            self.store.remove_tenant(name)
        return {"name": name, "deleted": True, "deltas_deleted": len(rows)}

    def gauges(self) -> None:
        series = (("cache_bytes", "cache_bytes", "Bytes of deltas in the cache", "gauge"),
                  ("cache_capacity_bytes", "cache_capacity_bytes", "The cache's budget in bytes", "gauge"),
                  ("deltas_loaded", "deltas_loaded", "Deltas attached now", "gauge"),
                  ("deltas_known", "deltas_known", "Deltas servable", "gauge"),
                  ("queue_depth", "queue_depth", "Requests waiting for a batch", "gauge"),
                  ("batches_total", "batches", "Batches run", "counter"),
                  ("batch_rows_total", "batch_rows", "Rows in those batches (divide by batches: the fill)", "counter"))
        values = {n: e.gauges() for n, e in self.engines.items()}
        for metric, key, help_, kind in series:
            self.metrics.set_gauge(metric, help_, {n: v[key] for n, v in values.items()}, kind)

    def close(self) -> None:
        for e in self.engines.values():
            e.stop()
        self.store.close()


# ---------------------------------------------------------------------------
# request bodies
# ---------------------------------------------------------------------------

async def json_body(request) -> dict:
    data = await request.body()
    if len(data) > MAX_JSON_BODY:
        raise HTTPError(413, f"request body of {len(data)} bytes exceeds {MAX_JSON_BODY}")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body


def _number(body: dict, key: str, default, kind=(int, float)):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise HTTPError(400, f"field {key!r} must be {'an integer' if kind is int else 'a number'}; got {v!r}")
    return v


def generation_params(body: dict) -> dict:
    """The sampling fields OpenAI clients send, checked; unsupported ones refused by name."""
    for key, ok in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)), ("logprobs", (None, False)),
                    ("suffix", (None,))):
        if body.get(key) not in ok:
            raise HTTPError(400, f"field {key!r}={body[key]!r} is not supported by this server (allowed: "
                                 f"{choices([v for v in ok if v is not None]) if ok != (None,) else 'null'})")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HTTPError(400, "field 'stop' must be a string or a list of strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise HTTPError(400, f"field 'seed' must be an integer from 0 to 2**63 - 1 or null; got {seed!r}")
    return {"max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 16, int),
            "temperature": float(_number(body, "temperature", 0.0)), "top_p": float(_number(body, "top_p", 1.0)),
            "stop": stop, "seed": seed}


# ---------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------

def create_app(engines: list[Engine] | Engine, deltas_dir, admin_key: str | None = None, max_upload_mb: float = 256):
    """The FastAPI app serving ``engines`` with deltas from (and uploads to) ``deltas_dir``."""
    srv = Server([engines] if isinstance(engines, Engine) else list(engines), deltas_dir, admin_key, max_upload_mb)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.close()   # finish the batches in flight, close the registry

    app = FastAPI(title="unipeft serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = srv

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": status}},
                            status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return error(e.status, str(e))

    @app.exception_handler(DeltaNotFound)
    async def _not_found(request, e):
        # the engine's message lists the deltas it holds, other tenants' included: never forwarded
        return error(404, NOT_FOUND)

    @app.exception_handler(UnipeftError)   # BadRequest and the library's own user errors
    async def _bad(request, e):
        return error(400, " ".join(str(e).split()))

    @app.exception_handler(StarletteHTTPException)   # unknown routes, wrong methods
    async def _routing(request, e):
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(RequestValidationError)   # a path parameter FastAPI itself rejected
    async def _validation(request, e):
        return error(400, f"invalid request: {e.errors()[:1]}")

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("internal error")
        return error(500, f"internal error ({type(e).__name__}); the server keeps serving")

    async def run(future):
        return await asyncio.wrap_future(future)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "bases": {n: {"kind": e.kind, **e.gauges()} for n, e in srv.engines.items()}}

    @app.get("/metrics")
    async def metrics(request: Request):
        srv.admin_only(srv.caller(request), "/metrics (it names every tenant's deltas)")
        srv.gauges()
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": srv.models(srv.caller(request))}

    @app.post("/v1/classify")
    async def classify(request: Request):
        tenant = srv.caller(request)
        body = await json_body(request)
        engine, key = srv.resolve(tenant, body.get("model"))
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not 0 < len(inputs) <= 256:
            raise HTTPError(400, "field 'input' must be a text or a list of 1-256 texts or [text, text] pairs")
        out = await run(engine.submit_classify(key, inputs))
        tokens = sum(r.pop("prompt_tokens") for r in out)
        return {"object": "list", "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"index": i, **r} for i, r in enumerate(out)]}

    def stream(engine, key, prompts, params, model: str, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        future = engine.submit_generate(key, prompts, on_text=lambda i, piece: loop.call_soon_threadsafe(
            queue.put_nowait, (i, piece)), **params)   # a bad request fails here, before any event is sent
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, None))
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            chunk = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            if chat:
                yield event(0, None, None, role=True)
            while (item := await queue.get()) is not None:
                yield event(item[0], item[1], None)
            try:
                answers = future.result()
            except Exception as e:   # e.g. the delta was deleted before its batch ran
                status = 404 if isinstance(e, DeltaNotFound) else 400 if isinstance(e, UnipeftError) else 500
                message = {404: NOT_FOUND, 400: str(e)}.get(status, f"internal error ({type(e).__name__})")
                failure = {"error": {"message": message, "type": ERROR_TYPES[status], "code": status}}
                yield f"data: {json.dumps(failure)}\n\n"
            else:
                for i, a in enumerate(answers):
                    yield event(i, None if chat else "", a["finish_reason"])
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage(answers: list[dict]) -> dict:
        p, c = sum(a["prompt_tokens"] for a in answers), sum(a["completion_tokens"] for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(request: Request):
        tenant = srv.caller(request)
        body = await json_body(request)
        engine, key = srv.resolve(tenant, body.get("model"))
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not 0 < len(prompts) <= MAX_PROMPTS or \
                not all(isinstance(p, str) for p in prompts):
            raise HTTPError(400, f"field 'prompt' must be a text or a list of 1-{MAX_PROMPTS} texts")
        params = generation_params(body)
        if body.get("stream"):
            return stream(engine, key, prompts, params, body["model"], chat=False)
        answers = await run(engine.submit_generate(key, prompts, **params))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body["model"], "usage": usage(answers),
                "choices": [{"index": i, "text": a["text"], "finish_reason": a["finish_reason"], "logprobs": None}
                            for i, a in enumerate(answers)]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        tenant = srv.caller(request)
        body = await json_body(request)
        engine, key = srv.resolve(tenant, body.get("model"))
        if engine.kind != "generate":
            raise BadRequest(f"{body['model']!r} is a classifier: use POST /v1/classify")
        prompt = engine.chat_prompt(body.get("messages"))
        params = generation_params(body)
        if body.get("stream"):
            return stream(engine, key, [prompt], params, body["model"], chat=True)
        answers = await run(engine.submit_generate(key, [prompt], **params))
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "usage": usage(answers),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answers[0]["text"]},
                             "finish_reason": answers[0]["finish_reason"]}]}

    @app.post("/v1/deltas", status_code=201)
    async def upload(request: Request):
        tenant = srv.caller(request)
        fields, files = await read_multipart(request, srv.max_upload)
        # validation attaches the delta on the model: off the event loop, so serving goes on
        return JSONResponse(await run_in_threadpool(srv.upload, tenant, fields, files), status_code=201)

    @app.delete("/v1/deltas/{model:path}")
    async def delete(model: str, request: Request):
        tenant = srv.caller(request)
        return await run_in_threadpool(srv.delete, tenant, model)

    @app.post("/v1/tenants", status_code=201)
    async def add_tenant(request: Request):
        srv.admin_only(srv.caller(request), "creating tenants")
        body = await json_body(request)
        return JSONResponse({"name": body.get("name"), "key": srv.store.add_tenant(body.get("name"))},
                            status_code=201)

    @app.get("/v1/tenants")
    async def list_tenants(request: Request):
        srv.admin_only(srv.caller(request), "listing tenants")
        return {"object": "list", "data": [{"name": t, "deltas": len(srv.store.deltas(t))}
                                           for t in srv.store.tenants()]}

    @app.post("/v1/tenants/{name}/keys", status_code=201)
    async def new_key(name: str, request: Request):
        srv.admin_only(srv.caller(request), "creating keys")
        if name not in srv.store.tenants():
            raise HTTPError(404, f"no tenant named {name!r}")
        return JSONResponse({"name": name, "key": srv.store.new_key(name)}, status_code=201)

    @app.delete("/v1/tenants/{name}")
    async def delete_tenant(name: str, request: Request):
        srv.admin_only(srv.caller(request), "removing tenants")
        if name not in srv.store.tenants():
            raise HTTPError(404, f"no tenant named {name!r}")
        return await run_in_threadpool(srv.remove_tenant, name)

    return app


def _size(d: Path) -> int:
    f = d / storage.TENSORS_NAME
    return f.stat().st_size if f.is_file() else 0
