"""The example's word-level tokenizer: a fixed vocabulary of special tokens and every source's words."""

from __future__ import annotations

from collections.abc import Sequence

from .sources import COLOURS, DIRECTIONS, NUMBERS, PHOTOS, SHAPES

__all__ = ["BOS", "EOS", "GEN", "IMAGE", "IMG", "PAD", "SEP", "VIDEO", "VOCAB", "decode", "encode"]

SPECIAL = ("<pad>", "<bos>", "<eos>", "<sep>", "<image>", "<video>", "<img>", "<gen>")
WORDS = (
    *("a", "the", "is", "are", "what", "which", "how", "many", "way", "does", "comes", "after", "in"),
    *("this", "these", "of", "has", "more", "same", "there", "shapes", "shape", "colour", "image"),
    *("describe", "move", "photo", "camera", "draw", "first", "second", "yes", "no", "?"),
    *COLOURS, *SHAPES, *NUMBERS, *DIRECTIONS, *PHOTOS,
    "where",  # the layout source (fine-tuning); new words go last so saved models keep their ids
)  # fmt: skip
VOCAB: tuple[str, ...] = SPECIAL + tuple(dict.fromkeys(WORDS))
"""Every token: the specials, then the words of every source's prompts and answers."""
_ID = {word: i for i, word in enumerate(VOCAB)}
PAD, BOS, EOS, SEP, IMAGE, VIDEO, IMG, GEN = range(len(SPECIAL))


def encode(text: str) -> list[int]:
    """Word-level token ids of ``text`` (space separated); an unknown word is a ``ValueError``."""
    try:
        return [_ID[w] for w in text.split()]
    except KeyError as err:
        raise ValueError(f"word {err.args[0]!r} of {text!r} is not in the vocabulary (tokens.VOCAB)") from err


def decode(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in ids)
