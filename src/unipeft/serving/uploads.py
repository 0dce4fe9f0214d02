"""Delta uploads: read a multipart body within limits, validate everything, then store atomically.

Two shapes are accepted, as files of a ``multipart/form-data`` body (optional form field
``name``; for peft also ``base`` when several bases are served):

* a unipeft delta: ``delta.json`` + ``delta.safetensors`` (as ``up.save`` writes them);
* a peft adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, converted
  to a unipeft delta on the way in (``up.import_peft``).

Nothing is written where the server looks for deltas until every check passed, and a failed
check changes nothing: the body is read with a byte limit (never trusting Content-Length
alone); file names are fixed (the client's filename only selects which of the four files a
part is, it never becomes a path) and the delta's name must match a strict pattern, so no name
can escape the deltas directory; tensors are parsed as safetensors from memory (a pickle is
never loaded: a pickled or truncated file fails that parse); the method must be known and
servable; the base fingerprint must be one of the served bases; the option sizes must agree
with the tensors before anything is allocated; the delta is then attached for real on the base
(every tensor's name and shape must fit) and must change the model's output on a probe input.
The checked files are written to a temporary folder beside the target and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .. import storage
from ..config import METHODS
from ..errors import UnipeftError, choices
from .engine import NAME, BadRequest, unroutable_kinds

UNIPEFT_FILES = (storage.JSON_NAME, storage.TENSORS_NAME)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_JSON_BYTES = 1 << 20
# integer options that size a delta's tensors: each must appear as a dimension of some tensor in
# the file, so a delta.json asking for r=10**6 is refused before attach allocates anything
SIZE_OPTIONS = ("r", "bottleneck", "length", "reparam_hidden", "num_virtual_tokens")


class HTTPError(UnipeftError):
    """An error with the HTTP status to answer (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_multipart(request, max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(form fields, files by their fixed name) of a multipart body no larger than ``max_bytes``."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPError(415, f"upload a delta as multipart/form-data (files {' + '.join(UNIPEFT_FILES)} or "
                             f"{' + '.join(PEFT_FILES)}); got content-type {ctype or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPError(413, f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")

    async def limited():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                raise HTTPError(413, f"upload exceeds the limit of {max_bytes} bytes")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=4, max_fields=4,
                                     max_part_size=MAX_JSON_BYTES).parse()
    except MultiPartException as e:
        raise HTTPError(400, f"malformed multipart body: {e.message}") from None
    fields, files = {}, {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
                continue
            fname = Path(value.filename or key).name   # which file this is; never used as a path
            if fname.endswith(PICKLES):
                raise HTTPError(415, f"{fname!r} is a pickle format, which the server never loads; send "
                                     f"safetensors files ({choices(UNIPEFT_FILES + PEFT_FILES)})")
            if fname not in UNIPEFT_FILES + PEFT_FILES:
                raise HTTPError(400, f"unexpected file {fname!r}; upload {' + '.join(UNIPEFT_FILES)} or "
                                     f"{' + '.join(PEFT_FILES)}")
            if fname in files:
                raise HTTPError(400, f"file {fname!r} appears twice in the upload")
            files[fname] = await value.read()
    finally:
        await form.close()
    return fields, files


def parse_json(name: str, data: bytes) -> dict:
    if len(data) > MAX_JSON_BYTES:
        raise HTTPError(413, f"{name} is {len(data)} bytes; the limit is {MAX_JSON_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"{name} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, f"{name} must hold a JSON object")
    return obj


def parse_safetensors(name: str, data: bytes) -> dict:
    """The tensors of a safetensors file held in memory; a pickle or a truncated file is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        safetensors_shaped = data[8:9] == b"{"   # an 8-byte header length, then the JSON header
        pickled = (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:2] == b"PK"
        if pickled and not safetensors_shaped:   # a pickle's PROTO opcode / torch.save's zip archive
            raise HTTPError(415, f"{name} is a pickled (torch.save) file, which the server never loads; save "
                                 f"the delta with up.save (safetensors)") from None
        raise HTTPError(400, f"{name} is not a valid safetensors file (truncated or another format: "
                             f"{' '.join(str(e).split())[:200]})") from None
    if not tensors:
        raise HTTPError(400, f"{name} holds no tensors")
    if any(not t.is_floating_point() for t in tensors.values()):
        raise HTTPError(400, f"{name}: every tensor of a delta must be floating point")
    return tensors


def check_sizes(where: str, options: dict, tensors: dict) -> None:
    """Size options must match the tensors, so no config makes attach allocate far more than sent."""
    dims = {d for t in tensors.values() for d in t.shape}
    top = max(dims, default=0)
    for k in SIZE_OPTIONS:
        v = options.get(k)
        if isinstance(v, int) and v > top:
            raise HTTPError(400, f"{where}: option {k}={v} does not fit the uploaded tensors (largest dimension "
                                 f"{top})")


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise HTTPError(400, f"delta name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
                             f"(starting with a letter or digit; no '/', '.' or spaces)")
    return name


def prepare(files: dict[str, bytes], fields: dict[str, str], engines: dict) -> dict:
    """Every check that needs no model: which format, name, method, base. Returns a plan for
    ``store``: {"format", "name", "engine", "method", ...}."""
    have = set(files)
    if have == set(UNIPEFT_FILES):
        meta = parse_json(storage.JSON_NAME, files[storage.JSON_NAME])
        if meta.get("format") != storage.FORMAT:
            raise HTTPError(400, f"delta.json is not a unipeft delta description (format {meta.get('format')!r})")
        m = meta.get("method")
        if not isinstance(m, dict) or not isinstance(m.get("options"), dict):
            raise HTTPError(400, "delta.json: field 'method' is missing or malformed")
        kind = m.get("kind")
        if kind not in METHODS:
            raise HTTPError(400, f"delta.json: unknown method {kind!r}; known methods: {choices(sorted(METHODS))}")
        if kind in unroutable_kinds():
            raise HTTPError(400, f"method {kind!r} cannot route per example (it changes the base model's own "
                                 f"weights or vocabulary), so it cannot be served beside other deltas; servable: "
                                 f"{choices(sorted(k for k in METHODS if k not in unroutable_kinds()))}")
        tensors = parse_safetensors(storage.TENSORS_NAME, files[storage.TENSORS_NAME])
        listed = meta.get("tensors")
        if not isinstance(listed, dict) or set(listed) != set(tensors):
            raise HTTPError(400, "delta.json and delta.safetensors disagree about which tensors the delta holds")
        check_sizes("delta.json", m["options"], tensors)
        fp = (meta.get("base") or {}).get("fingerprint")
        engine = next((e for e in engines.values() if e.serves_base_of(meta)), None)
        if engine is None:
            served = ", ".join(f"{e.name} ({e.fingerprint})" for e in engines.values())
            raise HTTPError(400, f"delta.json: base fingerprint {fp!r} matches no served base; served: {served}")
        return {"format": "unipeft", "name": check_name(fields.get("name") or meta.get("name")),
                "engine": engine, "method": kind}
    if have == set(PEFT_FILES):
        config = parse_json(PEFT_FILES[0], files[PEFT_FILES[0]])
        from ..peft_format import IMPORTABLE

        if config.get("peft_type") not in IMPORTABLE:
            raise HTTPError(400, f"adapter_config.json: peft_type {config.get('peft_type')!r} cannot be imported; "
                                 f"importable: {choices(IMPORTABLE)}")
        tensors = parse_safetensors(PEFT_FILES[1], files[PEFT_FILES[1]])
        check_sizes("adapter_config.json", config, tensors)
        if "name" not in fields:
            raise HTTPError(400, "a peft adapter upload needs a form field 'name' (the delta's name)")
        base = fields.get("base")
        if base is not None and base not in engines:
            raise HTTPError(400, f"base {base!r} is not served; bases: {choices(list(engines))}")
        if base is None and len(engines) > 1:
            raise HTTPError(400, f"several bases are served: name one with the form field 'base' "
                                 f"({choices(list(engines))})")
        engine = engines[base] if base else next(iter(engines.values()))
        return {"format": "peft", "name": check_name(fields["name"]), "engine": engine,
                "method": config["peft_type"].lower()}
    raise HTTPError(400, f"upload either {' + '.join(UNIPEFT_FILES)} or {' + '.join(PEFT_FILES)}; got "
                         f"{choices(sorted(have)) if have else 'no files'}")


def store(plan: dict, files: dict[str, bytes], target: Path, scratch: Path) -> int:
    """Validate on the model and write the delta to ``target`` atomically; returns its bytes."""
    engine = plan["engine"]
    nbytes = [0]

    def write(tmp: Path) -> None:
        if plan["format"] == "unipeft":
            for fname in UNIPEFT_FILES:
                (tmp / fname).write_bytes(files[fname])
            _validate(engine, tmp)
        else:
            _convert_peft(engine, plan["name"], files, tmp, scratch)
        nbytes[0] = sum(t.numel() * t.element_size()
                        for t in storage._read_tensors(tmp / storage.TENSORS_NAME).values())

    storage.write_directory(target, write)
    return nbytes[0]


def _validate(engine, folder: Path) -> None:
    try:
        with engine.trial(folder) as (internal, meta):
            if not engine.changes_output(internal, meta):
                raise HTTPError(400, "this delta changes nothing: the model's output with it equals the base's "
                                     "(all-zero or initial values); train it before uploading")
    except HTTPError:
        raise
    except UnipeftError as e:   # tensor names or shapes that do not fit the base, bad options...
        raise HTTPError(400, f"the delta does not fit base {engine.name}: {' '.join(str(e).split())}") from None


def _convert_peft(engine, name: str, files: dict[str, bytes], out: Path, scratch: Path) -> None:
    """Import a peft adapter onto the base (which checks every tensor) and save it as a unipeft delta."""
    from ..engine import detach
    from ..peft_format import import_peft

    scratch.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix="peft-", dir=scratch))
    try:
        for fname in PEFT_FILES:
            (src / fname).write_bytes(files[fname])
        with engine._model_lock:
            try:
                import_peft(engine.model, src, name=name, activate=False)
            except UnipeftError as e:
                raise HTTPError(400, f"the peft adapter does not fit base {engine.name}: "
                                     f"{' '.join(str(e).split())}") from None
            try:
                meta = {"method": {"kind": engine_kind(engine, name)}}
                if not engine.changes_output(name, meta):
                    raise HTTPError(400, "this adapter changes nothing: the model's output with it equals the "
                                         "base's; train it before uploading")
                storage.save(engine.model, src / "converted", name=name)
            finally:
                detach(engine.model, name)
        for fname in UNIPEFT_FILES:
            shutil.move(str(src / "converted" / fname), str(out / fname))
    finally:
        shutil.rmtree(src, ignore_errors=True)


def engine_kind(engine, name: str) -> str:
    from ..engine import registry

    return registry(engine.model).deltas[name].config.kind


__all__ = ["HTTPError", "read_multipart", "prepare", "store", "BadRequest"]
