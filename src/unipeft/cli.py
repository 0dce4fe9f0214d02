"""The ``unipeft`` command line.

Each subcommand is a pair (add_arguments(parser), run(args) -> exit code) registered in
``COMMANDS``; later subcommands (train, eval, predict, compare, analyze) plug in the same way.
User errors (UnipeftError, bad arguments) print ONE line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UnipeftError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UnipeftError(f"{self.prog}: {message}")


def _add_estimate(p: argparse.ArgumentParser) -> None:
    from .analysis.memory import DTYPE_BYTES, HIDDEN_FORMULAS, METHODS, OPTIMIZER_STATES, PRESETS
    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}), size like 7B, folder with config.json or hub id")
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--trainable-params", type=int, default=None, help="N_trainable (default: from the method)")
    p.add_argument("--bits", type=int, default=None, choices=(2, 4, 8),
                   help="QLoRA: the blocks' linear maps stored in this many bits (up.quantize; lora, peft, prompt)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES), help="default: bf16 on gpu, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZER_STATES))
    p.add_argument("--cuda-overhead-gb", type=float, default=1.0)
    p.add_argument("--hidden", default="notes", choices=HIDDEN_FORMULAS, help="hidden-state formula")
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                   help="gpu: the notes' formulas; cpu: the estimate calibrated on measured CPU runs (fp32)")
    p.add_argument("--task", default="causal-lm", choices=("causal-lm", "seq-cls"),
                   help="--device cpu: whether the model has a vocabulary head (logits)")
    p.add_argument("--prompt-length", type=int, default=0, help="--device cpu: prompt-tuning tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hardware-table", action="store_true", help="print the notes' hardware table, recomputed")


def _run_estimate(args) -> int:
    from .analysis import memory
    if args.hardware_table:
        rows = memory.hardware_table()
        print(json.dumps(rows) if args.json else memory.format_hardware_table(rows))
        if args.model is None:
            return 0
    if args.model is None:
        raise UnipeftError("estimate: give --model (or --hardware-table)")
    if args.device == "cpu":
        from .analysis.memory_cpu import estimate_cpu

        method = args.method
        trainable = args.trainable_params if args.trainable_params is not None else (
            None if method == "full" else memory.estimate(args.model, method=method, seq_len=args.seq_len).trainable_params)
        est = estimate_cpu(args.model, method=method, trainable_params=trainable, batch_size=args.batch_size,
                           seq_len=args.seq_len, task=args.task, prompt_length=args.prompt_length,
                           dtype=args.dtype or "fp32", optimizer=args.optimizer, bits=args.bits)
        if args.json:
            print(json.dumps(est))
        else:
            bits = f" (base in {args.bits} bits)" if args.bits else ""
            print(f"{est['model']}: method={method}{bits} device=cpu batch_size={est['batch_size']} "
                  f"seq_len={est['seq_len']} (MB = 2^20 bytes)")
            for part, mb in est["parts_mb"].items():
                print(f"{part:16s} {mb:10.1f} MB")
            print(f"{'total':16s} {est['total_mb']:10.1f} MB")
        return 0
    est = memory.estimate(args.model, method=args.method, trainable_params=args.trainable_params, dtype=args.dtype or "bf16",
                          batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                          cuda_overhead_gb=args.cuda_overhead_gb, hidden=args.hidden, bits=args.bits)
    print(json.dumps(est.to_dict()) if args.json else est.table())
    return 0


def _add_analyze(p: argparse.ArgumentParser) -> None:
    from .analysis import inspect_cli, intrinsic_dim_cli, lora_cli

    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for name, help_, add, run in (
        ("lora", "LoRA subspace similarity, amplification and spectrum (seed 002)", lora_cli.add_arguments,
         lora_cli.run),
        ("attention", "attention statistics per layer and head over a text corpus (seed 003)",
         inspect_cli.add_attention_arguments, inspect_cli.run_attention),
        ("probe", "probing with scalar mixing of the layers (seed 003)", inspect_cli.add_probe_arguments,
         inspect_cli.run_probe),
        ("intrinsic-dim", "d90: subspace training at a sweep of d against full fine-tuning (seeds 000, 002)",
         intrinsic_dim_cli.add_arguments, intrinsic_dim_cli.run),
    ):
        q = sub.add_parser(name, help=help_, description=help_)
        add(q)
        q.set_defaults(analysis_run=run)


def _run_analyze(args) -> int:
    if getattr(args, "analysis_run", None) is None:
        raise UnipeftError("analyze: give an analysis: lora, attention, probe or intrinsic-dim "
                           "(see unipeft analyze --help)")
    return args.analysis_run(args)


def _lazy(module: str, add: str, run: str):
    """(add, run) that import ``module`` only when used: `unipeft estimate` need not import the trainer."""
    import importlib

    return (lambda p: getattr(importlib.import_module(module), add)(p),
            lambda a: getattr(importlib.import_module(module), run)(a))


_T = "unipeft.training.cli"
# name -> (help, add_arguments, run)
COMMANDS = {
    "train": ("fine-tune a model with a method on a task, save the delta", *_lazy(_T, "add_train", "run_train")),
    "eval": ("evaluate a trained run on its dev or test split", *_lazy(_T, "add_eval", "run_eval")),
    "predict": ("predict labels or generate text with a trained run", *_lazy(_T, "add_predict", "run_predict")),
    "compare": ("train several methods on one task and compare parameters, time, memory, latency, accuracy",
                *_lazy("unipeft.comparison", "add_arguments", "run")),
    "search": ("S4 design-space search: layer groups, allocation and a strategy per group at a parameter budget",
               *_lazy("unipeft.search.cli", "add_search", "run_search")),
    "estimate": ("estimate GPU memory for fine-tuning (lecture notes' formulas)", _add_estimate, _run_estimate),
    "analyze": ("analyse a model or a trained delta: lora, attention, probe", _add_analyze, _run_analyze),
    "serve": ("serve deltas over HTTP: OpenAI-compatible completions and chat, classify, uploads, tenants",
              *_lazy("unipeft.serving.cli", "add_serve", "run_serve")),
    "tenants": ("manage the server's tenants and their API keys: add, list, remove, key",
                *_lazy("unipeft.serving.cli", "add_tenants", "run_tenants")),
    "icl": ("in-context learning: zero-, one- and few-shot prompting with a template and a verbalizer",
            *_lazy("unipeft.prompting.cli", "add_icl", "run_icl")),
    "pet": ("PET and iPET: pattern-verbalizer models on a few labels, soft labels, a distilled classifier",
            *_lazy("unipeft.prompting.cli", "add_pet", "run_pet")),
}


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and its subparsers; ``only`` builds just that command's arguments (faster start)."""
    parser = _Parser(prog="unipeft", description="unipeft: parameter-efficient fine-tuning tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}
    for name, (help_, add, _run) in COMMANDS.items():
        subs[name] = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            add(subs[name])
    return parser, subs


def apply_yaml_config(path: str, sub: argparse.ArgumentParser) -> None:
    """Use the options in a YAML file as the subcommand's defaults (the command line still wins)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise UnipeftError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UnipeftError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        return
    if not isinstance(values, dict):
        raise UnipeftError(f"config file {path} must hold a mapping of option: value")
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise UnipeftError(f"config file {path}: unknown option(s) {unknown}; valid: {', '.join(sorted(dests))}")
    for k, v in values.items():  # lists become the comma-separated form the command line takes
        if isinstance(v, list) and k not in ("method_option", "labels") and not any(isinstance(x, dict) for x in v):
            values[k] = ",".join(str(x) for x in v)
    opts = values.get("method_option")
    if isinstance(opts, list) and any(isinstance(x, dict) for x in opts):
        import json  # a mapping item (a composition's parts: methods: [{kind: ..., options: ...}]) as key=JSON

        values["method_option"] = [o for x in opts for o in (
            [f"{k}={json.dumps(v)}" for k, v in x.items()] if isinstance(x, dict) else [x])]
    sub.set_defaults(**values)


def main(argv=None) -> int:
    """Run one command; returns its exit code. A process of a distributed launch (its process group set up
    by the command) leaves through ``os._exit`` once the group is closed: see ``_leave``."""
    try:
        code = _main(argv)
    finally:
        closed = _end_process_group()
    if closed:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """Exit without interpreter finalization. After a distributed run, gloo's worker threads can still hold
    work objects whose tensors need the GIL of an interpreter being torn down, which aborts the process
    ("terminate called without an active exception", SIGABRT) after everything was written, and the
    launcher then reports the run as failed (pytorch/pytorch#179291 describes the teardown; seen in this
    project's FSDP2 tests). Everything a command writes is written by then, atomically."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed (a broken pipe)
            pass
    os._exit(code)


def _main(argv=None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        only = argv[0] if argv and argv[0] in COMMANDS and not any(a in ("-h", "--help") for a in argv[:1]) else None
        parser, subs = build_parser(only)
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            apply_yaml_config(args.config, subs[args.command])
            args = parser.parse_args(argv)
        if args.command is None:
            raise UnipeftError(f"unipeft: give a command: {', '.join(COMMANDS)} (see unipeft --help)")
        return COMMANDS[args.command][2](args)
    except UnipeftError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def _end_process_group() -> bool:
    """Under a launcher (accelerate, torchrun), close the process group before the interpreter exits:
    left to exit, gloo's threads can be torn down while running ('terminate called without an
    active exception', SIGABRT on one rank; seen once in CI on FSDP2). The ranks first meet at a barrier
    (gloo's monitored one, which gives up after a minute where a rank failed and never comes), so that
    no rank closes its group, and then leaves at once (``_leave``), while another still receives its
    part of the last collective. Returns whether it closed one."""
    torch = sys.modules.get("torch")  # only if this command imported it
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        import datetime

        try:
            if torch.distributed.get_backend() == "gloo":
                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                torch.distributed.barrier()
        except Exception:  # noqa: BLE001  a rank that failed: close anyway, its error is already reported
            pass
        torch.distributed.destroy_process_group()
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
