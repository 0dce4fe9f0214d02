"""One batch of requests on the model: padding, per-row sampling, per-row stopping and streaming.

The engine (``engine.py``) decides which requests share a batch; this module runs one such
batch. Every row may belong to a different delta (``up.route`` does that part), and in
generation every row also has its own ``max_tokens``, ``temperature``, ``top_p`` and stop
strings. ``model.generate`` runs the batch with the KV cache; a stopping criterion reads each
new token per row, finishes that row when its own limit, the end-of-sequence token or a stop
string is reached, and streams the row's new text to its request as it grows. Rows that finish
early are still carried (as padding) until the whole batch is done: ``generate`` cannot take a
row out of, or put one into, a batch in flight, and the routed prompt-tuning site keeps
per-row layout state for the life of a generation (see the report on continuous batching in
``engine.py``).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria


def pad(rows: list[dict[str, list[int]]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Stack tokenised rows into tensors, padding to the longest: on the left for generation (new
    tokens follow the last real one), on the right for classification (as the tokenizer does)."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list[list[int]]] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        col = []
        for r in rows:
            v, gap = list(r[key]), [fill] * (width - len(r[key]))
            col.append(gap + v if left else v + gap)
        out[key] = col
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


class RowSampling(LogitsProcessor):
    """Per-row temperature and nucleus (top-p) sampling in one batch; rows at temperature 0 get
    their argmax only, so a greedy request gives the same tokens in a sampling batch.

    A row with a generator (a request with a ``seed``) draws its token here, from that generator,
    and leaves only that token possible for ``generate``'s draw: its text then depends on its seed
    alone, never on the requests it happened to share a batch with (OpenAI's ``seed``). The
    generator lives on the row, so a row carried over to the next wave draws on where it was."""

    def __init__(self, temperatures: list[float], top_ps: list[float], generators: list | None = None):
        self.t = torch.tensor(temperatures, dtype=torch.float32)
        self.p = torch.tensor(top_ps, dtype=torch.float32)
        generators = generators or [None] * len(temperatures)
        self.generators = {i: g for i, (g, t) in enumerate(zip(generators, temperatures)) if g is not None and t > 0}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t, p = self.t.to(scores.device), self.p.to(scores.device)
        greedy = (t == 0)[:, None]
        warped = scores / t.clamp_min(1e-6)[:, None]
        ordered, index = warped.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token once the probability mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= p[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        warped = torch.full_like(warped, float("-inf")).scatter(1, index, ordered)
        only_max = torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(-1, keepdim=True), 0.0)
        out = torch.where(greedy, only_max, warped)
        for i, g in self.generators.items():  # seeded rows: their own draw (on the CPU, as generators are)
            token = torch.multinomial(out[i].float().softmax(-1).cpu(), 1, generator=g).to(out.device)
            out[i] = torch.full_like(out[i], float("-inf")).scatter(0, token, 0.0)
        return out


class Row:
    """What one generated row needs and has: limits, its tokens so far, and its streaming state."""

    def __init__(self, max_tokens: int, stop: list[str], on_text=None, seed: int | None = None):
        self.max_tokens, self.stop, self.on_text = max_tokens, stop, on_text
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.prompt: list[int] = []   # the prompt's token ids (a carried row resumes from prompt + ids)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0              # characters already streamed
        self.finish: str | None = None
        self.on_done = None        # called once when the row finishes (its request may be answered then)


class RowStops(StoppingCriteria):
    """Called by ``generate`` after every step: records each row's new token, finishes rows that
    reached their own end, streams the text that can no longer change, and tells ``generate``
    which rows are done (it pads those until every row is).

    ``cut(rows)``, asked after a step in which a row finished while others go on, may end
    the wave there (every row "done"): ``cut_short`` is then True and the unfinished rows, each
    with its tokens so far, are carried into the next wave with the requests that were waiting."""

    def __init__(self, rows: list[Row], tokenizer, eos: set[int], cut=None):
        self.rows, self.tok, self.eos, self.cut = rows, tokenizer, eos, cut
        self.cut_short = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        finished_now = False
        for row, token in zip(self.rows, new):
            if row.finish is not None:
                continue  # generate's padding after this row ended
            if token in self.eos:
                row.finish = "stop"
            else:
                row.ids.append(token)
                row.text = self.tok.decode(row.ids, skip_special_tokens=True)
                hit = _first_stop(row.text, row.stop)
                if hit is not None:
                    row.text, row.finish = row.text[:hit], "stop"
                elif len(row.ids) >= row.max_tokens:
                    row.finish = "length"
            self._stream(row)
            if row.finish is not None:
                finished_now = True
                if row.on_done is not None:
                    row.on_done()
        done = [r.finish is not None for r in self.rows]
        if finished_now and not all(done) and self.cut is not None and self.cut(self.rows):
            self.cut_short = True
            done = [True] * len(done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    @staticmethod
    def _stream(row: Row) -> None:
        if row.on_text is None:
            return
        if row.finish is not None:
            end = len(row.text)
        else:
            # hold back a partial character (a byte-level token mid-way through UTF-8) and any tail
            # that could still become a stop string, so streamed text never has to be taken back
            end = len(row.text.rstrip("\ufffd"))
            head = row.text[:end]
            end -= max((k for s in row.stop for k in range(1, min(len(s), end + 1)) if head.endswith(s[:k])),
                       default=0)
        if end > row.sent:
            row.on_text(row.text[row.sent:end])
            row.sent = end


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def buckets(sizes: list[tuple[int, int, int]], max_positions: int, overhead: float) -> list[list[int]]:
    """Cut jobs, sorted by length, into forwards: ``sizes[i]`` = (tokens, prompt positions, rows) of
    job i. A routed forward is as wide as its longest tokens plus its longest prompt (prompt tuning
    lays rows out as [P_i, x_i, padding]) and costs width x rows + ``overhead`` (a forward's fixed
    cost, in tokens); never wider than ``max_positions``. The exact minimum, by dynamic programming
    over the cut points (at most a batch's worth of jobs). Returns the groups of job indices."""
    n = len(sizes)
    best = [0.0] + [float("inf")] * n   # best[k]: cheapest way to run the first k jobs
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        rows = widest = longest_prompt = 0
        for i in range(k, 0, -1):          # the last forward holds jobs i-1 .. k-1
            tokens, prompt, count = sizes[i - 1]
            rows += count
            widest, longest_prompt = max(widest, tokens), max(longest_prompt, prompt)
            width = widest + longest_prompt
            if width > max_positions and i < k:
                break                       # wider than the model: not one forward
            cost = best[i - 1] + width * rows + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, i - 1
    groups, k = [], n
    while k > 0:
        groups.append(list(range(cut[k], k)))
        k = cut[k]
    return groups[::-1]
