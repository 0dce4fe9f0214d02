"""``unipeft serve`` and ``unipeft tenants``: the server and its tenants from a shell.

Registered in ``unipeft/cli.py``'s ``COMMANDS``; imported only when one of them runs, so the
other commands never import FastAPI.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import UnipeftError
from .demo import DEFAULT_DIR

LOOPBACK_NAMES = ("localhost",)


def add_serve(p) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="a base: a transformers folder, or an embedded one (smollm2, minilm); repeat for several "
                        "bases. Default: SmolLM2 and MiniLM with example deltas")
    p.add_argument("--deltas", default=None,
                   help=f"the deltas directory (one sub-directory per delta, as up.save writes; uploads land here "
                        f"too). Default with no --model: {DEFAULT_DIR}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: needs --admin-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-key", default=None, help="the admin's API key (default: $UNIPEFT_ADMIN_KEY; none: "
                                                     "loopback only, no keys)")
    p.add_argument("--cache-mb", type=float, default=256, help="deltas held in memory, in MiB of tensors (LRU)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask")
    p.add_argument("--max-upload-mb", type=float, default=256, help="largest delta upload")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the precision the bases are served in (deltas saved from float32 weights serve on any)")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, admin_key: str | None) -> None:
    if not admin_key and not is_loopback(host):
        raise UnipeftError(f"serve: refusing to listen on {host!r} without an admin key: anyone reaching it could "
                           f"use and upload deltas. Give --admin-key KEY (or set UNIPEFT_ADMIN_KEY), or listen on "
                           f"loopback (127.0.0.1, ::1 or localhost)")


def run_serve(args) -> int:
    admin = args.admin_key or os.environ.get("UNIPEFT_ADMIN_KEY") or None
    check_host(args.host, admin)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise UnipeftError(f"serve needs the server packages: pip install 'unipeft[serve]' ({e})") from None
    from .engine import Engine

    kw = {"cache_mb": args.cache_mb, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
          "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
    if not args.model:
        from .demo import engines

        deltas = Path(args.deltas) if args.deltas else DEFAULT_DIR
        bases = engines(deltas, **kw)
    else:
        if not args.deltas:
            raise UnipeftError("serve: give --deltas DIR (the deltas directory) with --model")
        deltas = Path(args.deltas)
        bases = [Engine(m, None, **kw) for m in args.model]
    app = create_app(bases, deltas, admin_key=admin, max_upload_mb=args.max_upload_mb)
    srv = app.state.server
    print(f"unipeft serve: {', '.join(f'{e.name} ({e.kind}, {len(e.known())} deltas)' for e in bases)} from "
          f"{deltas} on http://{args.host}:{args.port} ({'admin key set' if admin else 'no keys: loopback only'}; "
          f"{len(srv.store.tenants())} tenants)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_tenants(p) -> None:
    p.add_argument("action", choices=("add", "list", "remove", "key"),
                   help="add NAME (prints its key), list, remove NAME (and its deltas), key NAME (another key)")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--deltas", default=str(DEFAULT_DIR), help="the server's deltas directory (holds the registry)")


def run_tenants(args) -> int:
    from .store import STATE_DIR, Store, db_path

    if args.action != "list" and not args.name:
        raise UnipeftError(f"tenants {args.action}: give the tenant's NAME")
    if not Path(args.deltas).is_dir():
        raise UnipeftError(f"tenants: deltas directory {args.deltas!r} does not exist (the server's --deltas)")
    store = Store(db_path(args.deltas))
    try:
        if args.action == "add":
            print(store.add_tenant(args.name))
            print(f"tenant {args.name!r} created; the key above is shown once (stored hashed)", file=sys.stderr)
        elif args.action == "key":
            print(store.new_key(args.name))
        elif args.action == "list":
            for t in store.tenants():
                print(f"{t}\t{len(store.deltas(t))} deltas")
        else:
            deltas = store.remove_tenant(args.name)
            trash = Path(args.deltas) / STATE_DIR / "scratch"
            for _, path in deltas:   # a running server stops serving them: its registry no longer lists them
                if Path(path).exists():
                    trash.mkdir(parents=True, exist_ok=True)
                    moved = trash / f"removed-{args.name}-{Path(path).name}"
                    Path(path).replace(moved)
                    shutil.rmtree(moved, ignore_errors=True)
            print(f"tenant {args.name!r} removed with {len(deltas)} deltas", file=sys.stderr)
    finally:
        store.close()
    return 0


def free_port() -> int:
    """A free TCP port on loopback (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """A uvicorn server for ``app`` in a thread on a free loopback port (tests and benchmarks
    drive the real HTTP stack with it); ``stop()`` ends it."""

    def __init__(self, app, timeout: float = 30.0):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t = time.time()
        while not self.server.started:
            if time.time() - t > timeout or not self.thread.is_alive():
                raise UnipeftError(f"the server did not start on {self.url} within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
