"""The processes ``unipeft compare`` runs its methods in: one fresh process per method, so that each
method's peak memory is its own and nothing is left over from the method before.

Where the platform can fork, a server process (``python -m unipeft.compare_workers --server``) imports
torch, transformers and unipeft once and builds each model's classes on the meta device once, then
forks one child per method; elsewhere each method starts a new interpreter (``--worker SPEC.json``).
A child reads its spec (JSON), runs ``comparison.run_method`` and writes the record; the parent relays
the child's progress lines and reads the record back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import fileio, progress
from .errors import UnipeftError


def worker(spec_path: str) -> int:
    """One method in this process: read its spec, run it, write its record (an error becomes the record)."""
    from .comparison import run_method
    from .training.cli import setup_runtime

    spec = json.loads(Path(spec_path).read_text())
    setup_runtime()  # run_method sets the threads
    try:
        record = run_method(spec)
    except UnipeftError as e:
        record = {"method": spec["method"], "error": " ".join(str(e).split())}
    except Exception as e:  # noqa: BLE001 -- reported in the table, the other methods still run
        record = {"method": spec["method"], "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    fileio.write_json(spec["result"], record, default=str)
    return 0


class Workers:
    """Runs each method in a fresh process of its own (its own peak memory, nothing left over from the
    method before). Where the platform can fork, the processes fork from one server that imported
    torch, transformers and unipeft once, which saves ~3 s of imports per method (a minute and more
    of the main job); elsewhere each method starts a new interpreter."""

    DONE = "[unipeft-worker-done]"

    def __init__(self):
        self.server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait()
            self.server = None

    def run(self, spec: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="unipeft-compare-") as tmp:
            spec = {**spec, "result": str(Path(tmp) / "result.json")}
            path = Path(tmp) / "spec.json"
            path.write_text(json.dumps(spec))
            last, code = self._fork(path) if hasattr(os, "fork") else self._spawn(path)
            if Path(spec["result"]).is_file():
                return json.loads(Path(spec["result"]).read_text())
            return {"method": spec["method"], "error": f"worker process died: {last or f'exit code {code}'}"}

    def _spawn(self, path: Path):
        proc = subprocess.Popen([sys.executable, "-m", "unipeft.compare_workers", "--worker", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last = self._relay(proc.stderr)[0]
        return last, proc.wait()

    def _fork(self, path: Path):
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, "-m", "unipeft.compare_workers", "--server"],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True, bufsize=1)
        try:
            self.server.stdin.write(f"{path}\n")
            self.server.stdin.flush()
        except BrokenPipeError:
            return "the worker server died", self.server.wait()
        return self._relay(self.server.stderr)

    def _relay(self, stream):
        """Pass the worker's progress lines through (indented) until it ends; the last other line
        names a failure."""
        last = ""
        for line in stream:
            if line.startswith(self.DONE):
                return last, int(line.split()[-1])
            if line.startswith("[unipeft]"):
                if not progress.quiet():
                    sys.stderr.write("    " + line)
                    sys.stderr.flush()
            elif line.strip():
                last = line.strip()
        return last, None


def _warm(spec_path: str, done: set) -> None:
    """Import the model's own modules in the server, once per model, by building it on the meta
    device (no weights, no memory): each child then loads in a fraction of a second instead of ~2 s."""
    try:
        import torch
        import transformers

        from .training import run

        model = json.loads(Path(spec_path).read_text())["model"]
        if model in done:
            return
        done.add(model)
        with torch.device("meta"):
            transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(run.model_path(model)))
    except Exception:  # noqa: BLE001 -- only a head start: the child meets (and reports) any real problem
        pass


def _serve() -> int:
    """The worker server: imports once, then forks one child per spec path read from stdin."""
    import torch  # noqa: F401 -- imported here, once, for every child
    import transformers  # noqa: F401

    from .training import run  # noqa: F401

    warm = set()
    for line in sys.stdin:
        _warm(line.strip(), warm)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = worker(line.strip())
            except BaseException as e:  # noqa: BLE001 -- the child must end here, never run the loop; say why
                print(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"{Workers.DONE} {os.waitstatus_to_exitcode(status)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    if len(sys.argv) == 2 and sys.argv[1] == "--server":
        sys.exit(_serve())
    sys.exit("usage: python -m unipeft.compare_workers --worker SPEC.json | --server (internal; use `unipeft compare`)")
