"""Sharing deltas through the Hugging Face Hub.

``push(model, "user/repo", name=...)`` saves a delta (``delta.json`` +
``delta.safetensors``) with a short model card and uploads the three files to a
model repository. ``up.load(model, "user/repo")`` downloads those two files
(nothing else, whatever else the repository holds) through ``huggingface_hub``'s
cache and loads them as a local delta. Hub failures (offline mode, no network,
no such repository or revision) become one ``UnipeftError`` that says what to do.
``huggingface_hub`` is imported inside the functions: it comes with
transformers, but only these two calls need it.
"""
from __future__ import annotations

import importlib
import re
import tempfile
from pathlib import Path

import torch.nn as nn

from .errors import UnipeftError
from .fileio import write_text
from .storage import JSON_NAME, TENSORS_NAME, pick_delta, read_meta, save

README_NAME = "README.md"
# the Hub's own rule for a namespaced repo id: "user/name", letters, digits, '-', '_' and '.'
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_repo_id(value) -> bool:
    """True for a string shaped like ``"user/repo"`` (a ``Path`` is always local)."""
    return (isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value
            and not value.endswith((".", ".git")))


def _check_repo_id(repo_id) -> None:
    if not looks_like_repo_id(repo_id):
        raise UnipeftError(f"not a Hugging Face Hub repo id: {repo_id!r}; give it as 'user/repo' "
                           f"(letters, digits, '-', '_' and '.')")


def _network_errors() -> tuple:
    """What a failed connection raises. huggingface_hub lets its HTTP client's transport errors
    through (requests, then httpx, now httpx2, depending on its version), so collect whichever exist."""
    errors = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _unreachable(what: str, error: Exception) -> UnipeftError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE=1)"
        fix = "unset HF_HUB_OFFLINE (or set it to 0) on a machine with network access"
    else:
        why = f"the Hugging Face Hub is unreachable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        fix = "check the network connection and HF_ENDPOINT"
    return UnipeftError(f"{what}: {why}; {fix}, or use a local delta directory (up.save / up.load(model, path))")


def model_card(meta: dict, repo_id: str, base_id: str | None) -> str:
    """A short README for the Hub: what the delta is, what it needs, how to load it."""
    m, b = meta["method"], meta["base"]
    options = ", ".join(f"{k}={v!r}" for k, v in sorted(m["options"].items()) if v is not None)
    front = ["---", "library_name: unipeft", "tags:", "- unipeft", "- peft", f"- {m['kind']}"]
    if base_id:
        front.append(f"base_model: {base_id}")
    front.append("---")
    cls = b.get("class") or "AutoModel"
    load_base = (f'model = {cls}.from_pretrained("{base_id}")' if base_id
                 else f"model = {cls}.from_pretrained(...)  # the {b.get('model_type')} base this delta was trained on")
    return "\n".join(front + [
        "",
        f"# {repo_id}",
        "",
        f"A [unipeft](https://pypi.org/project/unipeft/) delta `{meta['name']}`: **{m['kind']}** "
        f"({m.get('type')}), {meta['parameters']:,} parameters.",
        "",
        f"- method options: {options or '(defaults)'}",
        f"- base model: {b.get('model_type')} `{b.get('class')}`, fingerprint `{b.get('fingerprint')}` "
        f"(checked when loading)",
        f"- files: `{JSON_NAME}` (description) and `{TENSORS_NAME}` (the delta's tensors only)",
        "",
        "```python",
        "import unipeft as up",
        f"from transformers import {cls}",
        load_base,
        f'up.load(model, "{repo_id}")',
        "```",
        "",
    ])


def _base_id(model: nn.Module) -> str | None:
    """The base model's Hub id, when it was loaded from the Hub (not a local folder)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if looks_like_repo_id(name) and not Path(name).exists():
        return name
    return None


def push(model: nn.Module, repo_id: str, name: str | None = None, *, token: str | None = None,
         private: bool | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload delta ``name`` of ``model`` to the Hub model repo ``repo_id`` (created if missing).

    Only ``delta.json``, ``delta.safetensors`` and a README (model card) are
    uploaded. ``private`` applies when the repo is created (None: the Hub's
    default); ``token`` defaults to the logged-in one. Returns the repo's URL.
    """
    _check_repo_id(repo_id)
    name = pick_delta(model, name, "push").name  # no delta, an unknown or ambiguous name: fail before the network
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="unipeft-push-") as tmp:
        folder = save(model, Path(tmp) / "delta", name)
        meta = read_meta(folder)
        write_text(folder / README_NAME, model_card(meta, repo_id, _base_id(model)))
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            message = commit_message or f"unipeft delta {meta['name']!r} ({meta['method']['kind']})"
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
                              allow_patterns=[JSON_NAME, TENSORS_NAME, README_NAME], commit_message=message)
        except _network_errors() as e:
            raise _unreachable(f"cannot push to Hub repo {repo_id!r}", e) from None
        except HfHubHTTPError as e:
            raise UnipeftError(f"the Hub refused to push to {repo_id!r}: {str(e).splitlines()[0][:200]}; "
                               f"check that you are logged in (hf auth login, or token=) with write access") from None
    return str(url)


def download(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Fetch a delta's two files from the Hub (or the local Hub cache) and return their folder."""
    _check_repo_id(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, repo_type="model",
                                        allow_patterns=[JSON_NAME, TENSORS_NAME]))
    except RepositoryNotFoundError:  # also gated repos without access
        raise UnipeftError(f"{repo_id!r} is neither a local delta directory nor a Hugging Face Hub repo you can "
                           f"read; check the path or repo id, and pass token= (or hf auth login) for a private "
                           f"repo") from None
    except RevisionNotFoundError:
        raise UnipeftError(f"Hub repo {repo_id!r} has no revision {revision!r}; give a branch, tag or commit "
                           f"that exists") from None
    except (LocalEntryNotFoundError, *_network_errors()) as e:
        # LocalEntryNotFoundError: offline (or no network) and not in the local Hub cache either
        raise _unreachable(f"{repo_id!r} is not a local directory and cannot be downloaded from the Hub", e) from None
    except HfHubHTTPError as e:
        raise UnipeftError(f"downloading {repo_id!r} from the Hub failed: {str(e).splitlines()[0][:200]}") from None
    missing = [f for f in (JSON_NAME, TENSORS_NAME) if not (folder / f).is_file()]
    if missing:
        raise UnipeftError(f"Hub repo {repo_id!r} holds no unipeft delta ({' and '.join(missing)} missing at its "
                           f"top level); push one with up.push(model, {repo_id!r})")
    return folder
