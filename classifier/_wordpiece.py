"""A fast path for BERT WordPiece tokenization of ASCII text, exact to the `tokenizers` library.

Batch scoring is bound by tokenization: the `tokenizers` library costs ~100 µs of CPU per
arena-hard prompt here, more than the student's inference. For ASCII text, BERT's normalizer is
a lowercase, its pre-tokenizer a split into runs of letters and digits and single punctuation
marks, and WordPiece depends only on the word; so ids are looked up per word in a cache filled by
the library's own WordPiece model. Text this path cannot reproduce exactly (non-ASCII, control
characters, special-token strings) goes to the library. ``tests/classifier/test_runtime.py``
checks that both paths give the same ids on real prompts.
"""

from __future__ import annotations

import json
import re
from typing import Any

_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
# ASCII controls other than tab, newline and carriage return: the normalizer drops or maps them
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class FastWordPiece:
    """Token ids of ASCII text, identical to a BERT-style ``tokenizers.Tokenizer`` with
    ``[CLS] text [SEP]`` and truncation to ``max_tokens``; ``ids`` returns None for other text."""

    max_words = 200_000  # cached words before the cache starts over

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self._model = tokenizer.model
        self._cls = tokenizer.token_to_id("[CLS]")
        self._sep = tokenizer.token_to_id("[SEP]")
        self._specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self._budget = max_tokens - 2
        self._words: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_tokens: int) -> FastWordPiece | None:
        """A fast path for ``tokenizer`` if it is BERT's uncased pipeline, else None."""
        spec = json.loads(tokenizer.to_str())
        norm, pre, model = (
            spec.get("normalizer") or {},
            spec.get("pre_tokenizer") or {},
            spec["model"],
        )
        post = spec.get("post_processor") or {}
        single = [next(iter(x.values()))["id"] for x in post.get("single", [])]
        bert = (
            norm.get("type") == "BertNormalizer"
            and norm.get("lowercase") is True
            and norm.get("clean_text") is True
            and pre.get("type") == "BertPreTokenizer"
            and model.get("type") == "WordPiece"
            and post.get("type") == "TemplateProcessing"
            and single == ["[CLS]", "A", "[SEP]"]
            and tokenizer.token_to_id("[CLS]") is not None
            and tokenizer.token_to_id("[SEP]") is not None
            and max_tokens >= 3
        )
        return cls(tokenizer, max_tokens) if bert else None

    def ids(self, text: str) -> list[int] | None:
        if not text.isascii() or _CONTROL.search(text):
            return None
        if "[" in text and any(s in text for s in self._specials):
            return None
        words = self._words
        if len(words) > self.max_words:
            words.clear()
        out = [self._cls]
        limit = self._budget + 1
        for word in _WORD.findall(text.lower()):
            piece = words.get(word)
            if piece is None:
                piece = words[word] = [t.id for t in self._model.tokenize(word)]
            out += piece
            if len(out) > limit:
                del out[limit:]
                break
        out.append(self._sep)
        return out
