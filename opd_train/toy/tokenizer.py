"""A character-level tokenizer of the toy task, saved in HF format (``tokenizer.json``).

Every model directory of the experiment carries it, so transformers (our CPU engine), Megatron (the trainer) and
the driver decode the same ids. ``$`` is the end-of-sequence token.
"""
from __future__ import annotations

SYMBOLS = ["<pad>", "$"] + list("0123456789") + ["+", "="]
PAD_ID, EOS_ID = 0, 1
# The model's embedding has a little headroom over the 14 symbols (ids 14, 15 are never produced by the data):
# SGLang echoes id vocab_size-1 as 0 (SPEC section 3), so keep the last id unused anyway.
MODEL_VOCAB_SIZE = 16


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` that splits text into characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(SYMBOLS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="$", pad_token="<pad>", unk_token="<pad>")


def encode(text: str) -> list[int]:
    """Fast path for the task's own strings (no tokenizer object needed)."""
    index = {s: i for i, s in enumerate(SYMBOLS)}
    try:
        return [index[c] for c in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the toy vocabulary {SYMBOLS}") from exc


def save_tokenizer(directory: str) -> None:
    build_tokenizer().save_pretrained(directory)
