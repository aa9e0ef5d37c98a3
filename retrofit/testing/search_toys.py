"""A character tokenizer and toy multiple-choice examples for search tests on tiny random models."""

from __future__ import annotations

from retrofit.core.data import Example


class CharTokenizer:
    """One token per character (ids 3..vocab-1, folded), enough of the Hugging Face interface for the search."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def _id(self, ch: str) -> int:
        return 3 + ord(ch) % (self.vocab_size - 3)

    def __call__(self, text: str, add_special_tokens: bool = False):
        ids = [self._id(c) for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids) -> str:
        return "".join(chr(i - 3 + 32) if i >= 3 else "" for i in ids)


_WORDS = ["red apple", "blue sky", "green leaf", "cold ice", "hot sun", "dark night", "loud drum", "soft fur",
          "tall tree", "fast car", "slow snail", "sweet honey"]


def toy_examples(n: int = 6, n_choices: int = 4) -> list[Example]:
    """Deterministic 4-choice questions (gold cycles over the choices); a random model gets some right."""
    out = []
    for i in range(n):
        choices = [_WORDS[(i + k) % len(_WORDS)] for k in range(n_choices)]
        out.append(Example(id=f"toy/{i}", prompt=f"Question: which is item {i}?\nAnswer:", choices=choices,
                           gold=i % n_choices, kind="mc", task="toy"))
    return out
