"""What a trained LoRA delta looks like: after the lecture notes (seed 002, "Why r=1 works well in
practice?") and Hu et al. 2021, section 7 ("Understanding the low-rank updates").

Subspace similarity (notes; paper eq. 4). For A_r1 (r1 x k) and A_r2 (r2 x k), the LoRA down-projections
of two runs, let U^i be the top-i right-singular vectors of A (columns in R^k). Then

    phi(A1, A2, i, j) = ||U_{A1}^{i T} U_{A2}^{j}||_F^2 / min(i, j)   in [0, 1]

is 1 when one subspace contains the other and 0 when they are orthogonal. The paper (r = 8 vs r = 64,
GPT-3, Figure 3) finds the top direction shared (phi > 0.5) and the rest mostly noise: "r = 1 works".

Amplification (notes' table; paper Table 7). With U, V the top-r left/right singular directions of a
matrix, ||U^T W V^T||_F measures how much of W lies in that r-dimensional subspace. Taking U, V from
(1) ΔW, (2) W itself, (3) a random Gaussian matrix: ΔW correlates with W more than random does, but
amplifies directions that are *not* W's top ones; the amplification factor is
||ΔW||_F / ||U_ΔW^T W V_ΔW^T||_F.

Spectrum: the singular values of each ΔW = scale * B A (at most r nonzero).

Every source ``src`` is either ``(model, name)`` (an attached delta) or a saved delta directory
(read with safetensors + delta.json, no base model needed). All SVDs run in float64.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UnipeftError
from .plotting import pyplot, save


# ---------------------------------------------------------------------------
# reading LoRA factors
# ---------------------------------------------------------------------------

def lora_factors(src) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A (r, in), B (out, r), scale)} in float64, from (model, name) or a saved directory."""
    if isinstance(src, (str, os.PathLike)):
        return _factors_from_dir(Path(src))
    if isinstance(src, tuple) and len(src) == 2:
        return _factors_from_model(*src)
    raise UnipeftError(f"expected (model, name) or a delta directory, got {type(src).__name__}")


def _factors_from_model(model, name: str):
    from ..engine import _require
    from ..methods.lora import LoRADelta

    _, delta = _require(model, name)
    out = {}
    for p, d in delta.linear.items():
        if isinstance(d, LoRADelta):  # factors(): DyLoRA at its current rank, AdaLoRA's diag(λ) Q
            a, b, s = d.factors()
            out[p] = (a.detach().double().cpu(), b.detach().double().cpu(), float(s))
    if not out:
        raise UnipeftError(f"delta {name!r} has no LoRA matrices (method {delta.config.kind!r})")
    return out


def _factors_from_dir(d: Path):
    from ..storage import TENSORS_NAME, _read_tensors, read_meta

    meta = read_meta(d)
    m = meta["method"]
    if m.get("kind") != "lora":
        raise UnipeftError(f"{str(d)!r} holds a {m.get('kind')!r} delta, not LoRA")
    opts = m.get("options", {})
    alpha = float(opts.get("alpha", 16.0))
    tensors = _read_tensors(d / TENSORS_NAME)
    out = {}
    for key, a in tensors.items():
        if key.startswith("linear:") and key.endswith(".lora_A"):
            path = key[len("linear:"):-len(".lora_A")]
            b = tensors.get(f"linear:{path}.lora_B")
            if b is None:
                raise UnipeftError(f"{str(d)!r} is corrupted: {path}.lora_B is missing")
            out[path] = (a.double(), b.double(), alpha / a.shape[0])  # the module's rank (random-rank LoRA)
    if not out:
        raise UnipeftError(f"{str(d)!r} holds no LoRA matrices")
    return out


def _base_weight(model, path: str) -> torch.Tensor:
    """W of a module as (out, in), float64."""
    from ..positions import LinearSite

    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise UnipeftError(f"the base model has no module {path!r}: is it the delta's base?") from None
    w = m.unipeft_weight_out_in() if isinstance(m, LinearSite) else m.weight
    return w.detach().double().cpu()


# ---------------------------------------------------------------------------
# subspace similarity
# ---------------------------------------------------------------------------

def _right_vectors(a: torch.Tensor) -> torch.Tensor:
    """Right-singular vectors of a (rows of Vh, best first), float64."""
    return torch.linalg.svd(a.double(), full_matrices=False).Vh


def similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for i = 1..r1, j = 1..r2 as an (r1, r2) float64 matrix."""
    if A1.shape[-1] != A2.shape[-1]:
        raise UnipeftError(f"A matrices act on different spaces: {tuple(A1.shape)} vs {tuple(A2.shape)}")
    v1, v2 = _right_vectors(A1), _right_vectors(A2)
    overlap = (v1 @ v2.T) ** 2                        # (r1', r2'): squared cosines of singular directions
    cum = overlap.cumsum(0).cumsum(1)                 # cum[i-1, j-1] = ||U1^i^T U2^j||_F^2
    r1, r2 = A1.shape[0], A2.shape[0]
    grid = torch.zeros(r1, r2, dtype=torch.float64)   # a rank-deficient A has fewer directions: pad
    grid[:cum.shape[0], :cum.shape[1]] = cum
    grid[cum.shape[0]:, :] = grid[cum.shape[0] - 1:cum.shape[0], :]
    grid[:, cum.shape[1]:] = grid[:, cum.shape[1] - 1:cum.shape[1]]
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return (grid / torch.minimum(i, j)).clamp(0.0, 1.0)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U_{A1}^{i T} U_{A2}^{j}||_F^2 / min(i, j)."""
    if not (1 <= i <= A1.shape[0] and 1 <= j <= A2.shape[0]):
        raise UnipeftError(f"need 1 <= i <= {A1.shape[0]} and 1 <= j <= {A2.shape[0]}, got i={i}, j={j}")
    return float(similarity_grid(A1, A2)[i - 1, j - 1])


def compare_deltas(src1, src2, matrix: str = "A") -> dict[str, torch.Tensor]:
    """{module path: phi grid} for the module paths both LoRA deltas adapt.

    matrix="A" compares the A matrices (right-singular vectors, as the paper's Figure 3);
    matrix="B" compares the B matrices (their left-singular vectors, i.e. the rows of B^T).
    """
    if matrix not in ("A", "B"):
        raise UnipeftError(f"matrix must be 'A' or 'B', got {matrix!r}")
    f1, f2 = lora_factors(src1), lora_factors(src2)
    common = [p for p in f1 if p in f2]
    if not common:
        raise UnipeftError("the two deltas adapt no module in common")
    k = 0 if matrix == "A" else 1
    return {p: similarity_grid(*(f[p][k] if k == 0 else f[p][k].T for f in (f1, f2))) for p in common}


def _short(path: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'layer 3 query'."""
    parts = path.split(".")
    nums = [p for p in parts if p.isdigit()]
    return (f"layer {nums[-1]} " if nums else "") + parts[-1]


def _pick(paths: list[str], n: int) -> list[str]:
    if len(paths) <= n:
        return paths
    step = (len(paths) - 1) / (n - 1)
    return [paths[round(t * step)] for t in range(n)]


def plot_similarity(result: dict[str, torch.Tensor], path_png, paths: list[str] | None = None,
                    max_panels: int = 4, labels: tuple[str, str] = ("i", "j")) -> Path:
    """Heatmaps of phi over (i, j), one panel per module path (a few chosen if there are many)."""
    plt = pyplot()
    paths = paths or _pick(list(result), max_panels)
    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths) + 0.8, 3.0), squeeze=False)
    im = None
    for ax, p in zip(axes[0], paths):
        g = result[p].numpy()
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                       extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
        ax.set_title(_short(p), fontsize=9)
        ax.set_xlabel(labels[1])
    axes[0][0].set_ylabel(labels[0])
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, label="phi(i, j)")
    return save(fig, path_png)


# ---------------------------------------------------------------------------
# amplification (paper Table 7)
# ---------------------------------------------------------------------------

def _projected_norm(w: torch.Tensor, m: torch.Tensor, r: int) -> float:
    """||U^T W V^T||_F with U, V the top-r left/right singular directions of m."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return float(torch.linalg.matrix_norm(u[:, :r].T @ w @ vh[:r].T))


def amplification(model, delta, *, r: int | None = None, seed: int = 0) -> list[dict]:
    """One row per adapted module: how ΔW relates to the base weight W.

    ``delta`` is the name of a delta attached to ``model`` or a saved LoRA directory (then ``model`` is
    only the base). ``r`` is the subspace rank (default: the LoRA rank). Columns: dW_norm = ||ΔW||_F,
    W_norm = ||W||_F, proj_dW / proj_W / proj_random = ||U^T W V^T||_F with U, V from ΔW, W or a seeded
    Gaussian matrix, amplification = dW_norm / proj_dW.
    """
    if isinstance(delta, os.PathLike) or (not _is_attached(model, delta) and (Path(delta).exists() or "/" in delta)):
        factors = lora_factors(Path(delta))
    else:
        from ..engine import _require

        if _require(model, str(delta))[1].merged:
            raise UnipeftError(f"delta {delta!r} is merged into the base weights: unmerge it first")
        factors = lora_factors((model, str(delta)))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for path, (a, b, scale) in factors.items():
        w = _base_weight(model, path)
        dw = scale * (b @ a)
        if w.shape != dw.shape:
            raise UnipeftError(f"{path}: base weight {tuple(w.shape)} does not match ΔW {tuple(dw.shape)}")
        k = r or a.shape[0]
        rand = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        proj_dw = _projected_norm(w, dw, k)
        dw_norm = float(torch.linalg.matrix_norm(dw))
        rows.append({
            "path": path, "r": k, "dW_norm": dw_norm, "W_norm": float(torch.linalg.matrix_norm(w)),
            "proj_dW": proj_dw, "proj_W": _projected_norm(w, w, k), "proj_random": _projected_norm(w, rand, k),
            "amplification": dw_norm / proj_dw if proj_dw > 0 else float("inf"),
        })
    return rows


def _is_attached(model, name) -> bool:
    from ..engine import registry

    reg = registry(model)
    return reg is not None and str(name) in reg.deltas


def format_table(rows: list[dict]) -> str:
    """The amplification rows as an aligned text table."""
    cols = ("r", "dW_norm", "proj_dW", "proj_W", "proj_random", "W_norm", "amplification")
    heads = ("r", "||dW||", "||U'WV'|| dW", "W", "random", "||W||", "amplif.")
    width = max([len("module")] + [len(row["path"]) for row in rows])
    lines = [f"{'module':<{width}}" + "".join(f"{h:>14}" for h in heads)]
    for row in rows:
        cells = "".join(f"{row[c]:>14d}" if c == "r" else f"{row[c]:>14.4f}" for c in cols)
        lines.append(f"{row['path']:<{width}}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# spectrum
# ---------------------------------------------------------------------------

def spectrum(src) -> dict[str, torch.Tensor]:
    """{module path: singular values of ΔW = scale * B A, largest first} (float64)."""
    return {p: torch.linalg.svdvals(scale * (b @ a)) for p, (a, b, scale) in lora_factors(src).items()}


def plot_spectrum(result: dict[str, torch.Tensor], path_png, top: int | None = None) -> Path:
    """Singular values of each ΔW (log scale), one line per module path."""
    plt = pyplot()
    if top is None:  # twice the largest numerical rank: the rest is rounding noise
        top = 2 * max(int((s > s[0] * 1e-10).sum()) if s[0] > 0 else 1 for s in result.values())
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for p, s in result.items():
        s = s[:top]
        ax.semilogy(range(1, len(s) + 1), s.clamp_min(1e-30).numpy(), marker=".", lw=1, label=_short(p))
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of ΔW")
    if len(result) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save(fig, path_png)
