"""Tiny random models of every supported family, built from configs (no download).

``make(family, head, seed)`` builds the same weights for the same seed, so a
"fresh base" in a test is ``make(...)`` again. ``batch(family, head)`` gives a
small padded batch that the model accepts.
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
FAMILIES = ("gpt2", "llama", "bert", "roberta", "t5", "bart")


def config(family: str):
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0)
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=70, pad_token_id=1)
    if family == "t5":
        return tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    raise KeyError(family)


CLASSES = {
    ("gpt2", "lm"): tf.GPT2LMHeadModel, ("gpt2", "cls"): tf.GPT2ForSequenceClassification,
    ("llama", "lm"): tf.LlamaForCausalLM, ("llama", "cls"): tf.LlamaForSequenceClassification,
    ("bert", "cls"): tf.BertForSequenceClassification, ("bert", "mlm"): tf.BertForMaskedLM,
    ("roberta", "cls"): tf.RobertaForSequenceClassification,
    ("t5", "seq2seq"): tf.T5ForConditionalGeneration,
    ("bart", "seq2seq"): tf.BartForConditionalGeneration, ("bart", "cls"): tf.BartForSequenceClassification,
}

# the head each family is tested with in the grid
DEFAULT_HEAD = {"gpt2": "lm", "llama": "lm", "bert": "cls", "roberta": "cls", "t5": "seq2seq", "bart": "seq2seq"}


def make(family: str, head: str | None = None, seed: int = 0, attn: str | None = None):
    head = head or DEFAULT_HEAD[family]
    cfg = config(family)
    if head == "cls":
        cfg.num_labels = 3
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn} if attn else {}
    model = CLASSES[(family, head)]._from_config(cfg, **kw)
    return model.eval()


def batch(family: str, head: str | None = None, seed: int = 1, length: int = 7):
    head = head or DEFAULT_HEAD[family]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    pad = config(family).pad_token_id or 0
    ids[1, -2:] = pad
    mask[1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if head == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits


def scramble(model, name: str = "t", seed: int = 0, scale: float = 0.3) -> None:
    """Move delta ``name``'s parameters off their init (many start at the identity), so that what the
    delta changes shows in the outputs."""
    import unipeft as up

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in up.engine.registry(model).deltas[name].parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------
# tiny models saved as folders, with a word-level tokenizer (for the trainer and the CLI)
# ---------------------------------------------------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
WORDS = ("good great fine nice superb lovely bad awful poor dull boring terrible the a movie film was is it very "
         "not and plot acting story really quite name food area price cheap high centre riverside pub cafe "
         "serves has in of at with near Alpha Bravo Delta Echo Kilo Lima Oscar Tango Zulu italian indian french "
         "chinese english [ ] , . = one two three four five").split()
TOKENS = SPECIALS + WORDS
assert len(TOKENS) <= VOCAB


def tokenizer(family: str):
    """A word-level fast tokenizer over TOKENS (ids < VOCAB); encoder families add [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOKENS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family in ("bert", "roberta"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    elif family in ("t5", "bart"):
        tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", pair="$A [SEP] $B [EOS]",
                                                           special_tokens=[("[SEP]", 3), ("[EOS]", 4)])
    names = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else ["input_ids", "attention_mask"]
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                      cls_token="[CLS]", sep_token="[SEP]", model_input_names=names)
    return fast


def save(path, family: str, head: str | None = None, num_labels: int = 2, seed: int = 0, dropout: bool = True):
    """A tiny model + tokenizer saved as a folder that ``from_pretrained`` (and ``--model``) accepts."""
    head = head or DEFAULT_HEAD[family]
    cfg = config(family)
    cfg.pad_token_id, cfg.eos_token_id = 0, 4
    if family in ("gpt2", "llama", "bart"):
        cfg.bos_token_id = 4
    if family in ("t5", "bart"):
        cfg.decoder_start_token_id = 0
    if family == "roberta":
        cfg.pad_token_id = 0
    if head == "cls":
        cfg.num_labels = num_labels
    if not dropout:
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "dropout_rate", "dropout", "attention_dropout", "activation_dropout", "classifier_dropout"):
            if hasattr(cfg, k) and getattr(cfg, k) is not None:
                setattr(cfg, k, 0.0)
    torch.manual_seed(seed)
    model = CLASSES[(family, head)]._from_config(cfg)
    model.save_pretrained(path)
    tokenizer(family).save_pretrained(path)
    return str(path)


def write_csv(path, header, rows) -> str:
    """A CSV file with a header row (data for the trainer and the CLI)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def sentiment_rows(n: int, seed: int = 0):
    """Synthetic sentiment: the label is whether the sentence holds a positive or a negative word."""
    import random

    rng = random.Random(seed)
    pos, neg = "good great fine nice superb lovely".split(), "bad awful poor dull boring terrible".split()
    fill = "the a movie film was is it very and plot acting story really quite".split()
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(fill) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(pos if label else neg))
        rows.append((" ".join(words), label))
    return rows


def table_rows(n: int, seed: int = 0):
    """Synthetic table-to-text (E2E-like): 'name = Alpha food = italian' -> 'Alpha serves italian food'."""
    import random

    rng = random.Random(seed)
    names = "Alpha Bravo Delta Echo Kilo Lima Oscar Tango Zulu".split()
    foods = "italian indian french chinese english".split()
    rows = []
    for _ in range(n):
        name, food = rng.choice(names), rng.choice(foods)
        rows.append((f"name = {name} food = {food}", f"{name} serves {food} food ."))
    return rows
