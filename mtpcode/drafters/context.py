"""Prompt lookup (Saxena 2023): drafts copied from where the text's last few tokens occurred before.

The longest recent match of the last 1..4 tokens (the pending one included)
in the text so far (prompt and generated tokens) or in the text after the
cursor (the suffix), and the tokens that followed it there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtpcode.drafters.base import Draft, Match
from mtpcode.generation import DraftSource


class ContextDrafter:
    """Prompt-lookup drafting over the prompt, the generated tokens and the suffix.

    Code repeats itself - a line retyped before identical text, a duplicated
    function, a test case like the one above it - and there these drafts are
    nearly always right.

    An index maps every n-gram (n = 1..``max_ngram``) of the text to where
    its latest occurrence ends, and every n-gram of the suffix to where its
    first occurrence ends (the text right after the cursor matters most). The
    index grows by ``max_ngram`` entries per accepted token; a lookup is
    ``max_ngram`` dictionary probes, then the match is measured backwards (up
    to ``max_extend`` tokens), since a longer agreement predicts a longer
    copy.

    The prompt's index is kept from one generation to the next, like the KV
    cache: an editor re-sends the file with a keystroke's difference at its
    end, so ``begin`` rewinds the index over the tokens that changed (at most
    ``max_rewind``; each n-gram whose latest occurrence was among them gets its
    latest earlier one back) and adds the new ones, giving exactly the index a
    fresh build would. What a generation commits lives in an overlay that the
    next ``begin`` drops.
    """

    source = DraftSource.CONTEXT
    max_ngram = 4
    max_extend = 16
    max_rewind = 64

    def __init__(self, max_draft: int = 16) -> None:
        self.max_draft = max_draft
        self._prompt: list[int] = []
        self._prompt_ids = np.zeros(0, dtype=np.int64)
        self._base: dict[tuple[int, ...], int] = {}  # the prompt's n-grams
        self._overlay: dict[tuple[int, ...], int] = {}  # n-grams ending in committed tokens (later: they win)
        self._text: list[int] = []
        self._suffix: list[int] = []
        self._suffix_index: dict[tuple[int, ...], int] = {}
        self._last_key: tuple[int, int] | None = None  # (pending, text length) of the last lookup
        self._last_match: Match | None = None

    def begin(self, prompt: Sequence[int], suffix: Sequence[int] = ()) -> None:
        """Start a generation: index the prompt (reusing the previous prompt's index) and the suffix."""
        new = [int(t) for t in prompt]
        old = self._prompt
        new_ids = np.asarray(new, dtype=np.int64)
        common = min(len(old), len(new))
        differ = np.flatnonzero(self._prompt_ids[:common] != new_ids[:common])
        keep = int(differ[0]) if differ.size else common
        if old and keep >= self.max_ngram and len(old) - keep <= self.max_rewind:
            self._rewind(keep)
            self._record(self._base, new, keep)
        else:
            self._base = self._build(new, latest=True)
        self._prompt = new
        self._prompt_ids = new_ids
        self._text = list(new)
        self._overlay = {}
        self._last_key = None
        suffix_ids = [int(t) for t in suffix]
        if suffix_ids != self._suffix or not self._suffix_index:
            self._suffix = suffix_ids
            self._suffix_index = self._build(suffix_ids, latest=False)

    def _rewind(self, keep: int) -> None:
        """Drop from the prompt's index the n-grams followed by a token at ``keep`` or later."""
        old, base = self._prompt, self._base
        kept = self._prompt_ids[:keep]
        for end in range(keep, len(old)):
            for n in range(1, min(self.max_ngram, end) + 1):
                key = tuple(old[end - n: end])
                if base.get(key) != end:
                    continue
                earlier = _latest_end(kept, key)
                if earlier is None:
                    del base[key]
                else:
                    base[key] = earlier

    def _record(self, index: dict[tuple[int, ...], int], seq: list[int], start: int) -> None:
        """Record in ``index`` the n-grams of ``seq`` followed by a token at ``start`` or later
        (later ends overwrite earlier ones: the latest occurrence wins)."""
        for end in range(max(start, 1), len(seq)):
            for n in range(1, min(self.max_ngram, end) + 1):
                index[tuple(seq[end - n: end])] = end

    def _text_end(self, key: tuple[int, ...]) -> int | None:
        """Where the latest occurrence of ``key`` in the text ends (it is followed by a token there)."""
        end = self._overlay.get(key)
        return self._base.get(key) if end is None else end

    def _build(self, seq: list[int], latest: bool) -> dict[tuple[int, ...], int]:
        """n-gram -> end of its latest (or first) occurrence, for n-grams followed by a token.

        Built from zipped slices: a dict keeps the last value given for a key,
        so the iteration order decides latest or first, at C speed.
        """
        index: dict[tuple[int, ...], int] = {}
        size = len(seq)
        for n in range(1, self.max_ngram + 1):
            if size <= n:
                break
            ends = range(n, size)  # the n-gram seq[end-n:end] is followed by seq[end]
            grams = zip(*(seq[i: size - n + i] for i in range(n)))
            pairs = zip(grams, ends)
            index.update(pairs if latest else reversed(list(pairs)))  # (n-grams of each n are distinct keys)
        return index

    def accept(self, tokens: Sequence[int]) -> None:
        """Tokens committed to the text (the verified pending token and accepted drafts)."""
        start = len(self._text)
        self._text.extend(int(t) for t in tokens)
        # n-grams ending just before each new token are now followed by it
        self._record(self._overlay, self._text, start)

    def propose(self, pending: int, room: int, draft: Draft) -> None:
        """The tokens that followed the best match (:meth:`lookup`), up to ``room``; the match goes
        to ``draft.match`` (the policy's evidence). Context drafts start the draft (position 0)."""
        match = self.lookup(pending)
        draft.match = match
        if match is None or draft.n:
            return
        for token in match.tokens[:room]:
            draft.add(token, DraftSource.CONTEXT)

    def lookup(self, pending: int) -> Match | None:
        """The best match for the text followed by ``pending``, or None (looked up once per step).

        The longer match wins; on a tie the suffix wins, then the text.
        """
        key = (pending, len(self._text))
        if key == self._last_key:
            return self._last_match
        self._last_key = key
        self._last_match = self._find(pending)
        return self._last_match

    def _find(self, pending: int) -> Match | None:
        text = self._text
        best: Match | None = None
        sources = (("suffix", self._suffix, self._suffix_index.get, bool(self._suffix_index)),
                   ("text", text, self._text_end, bool(self._base or self._overlay)))
        for where, seq, lookup, indexed in sources:
            if not indexed:
                continue
            for n in range(min(self.max_ngram, len(text) + 1), 0, -1):
                key = (*text[len(text) - n + 1:], pending) if n > 1 else (pending,)
                end = lookup(key)
                if end is None:
                    continue
                length = n + self._extend(seq, end - n, where == "text", n)
                if best is None or length > best.length:
                    tokens = self._continue(pending, end) if where == "text" else tuple(seq[end: end + self.max_draft])
                    best = Match(length, tokens, where)
                break
        return best

    def _continue(self, pending: int, end: int) -> tuple[int, ...]:
        """The ``max_draft`` tokens after a match in the text that ends at ``end``.

        Where the continuation reaches the end of the text it goes on with the
        pending token and then with itself: a match one period back in a
        repeating stretch (a loop, a run of similar lines) drafts the repetition
        in full, not only up to the text's end.
        """
        text = self._text
        n_text = len(text)
        out = text[end: end + self.max_draft]
        if len(out) < self.max_draft:
            out.append(pending)
            while len(out) < self.max_draft:
                out.append(out[end + len(out) - n_text - 1])
        return tuple(out)

    def _extend(self, seq: list[int], start: int, same: bool, n: int) -> int:
        """How many more tokens before the matched n-gram agree with the text before its last n-1 tokens."""
        text = self._text
        i = len(text) - n  # text[i] precedes the key's first token (the key ends with the pending token)
        j = start - 1
        extra = 0
        while extra < self.max_extend and i >= 0 and j >= 0 and (not same or j < i) and seq[j] == text[i]:
            extra += 1
            i -= 1
            j -= 1
        return extra

    @property
    def text(self) -> list[int]:
        """The indexed text (prompt and committed tokens)."""
        return self._text


def _latest_end(ids: np.ndarray, key: tuple[int, ...]) -> int | None:
    """Where the latest occurrence of ``key`` in ``ids`` that is followed by a token ends, or None."""
    n = len(key)
    starts = len(ids) - n  # windows ids[s:s+n] with s + n <= len(ids) - 1
    if starts <= 0:
        return None
    hit = ids[0:starts] == key[0]
    for i in range(1, n):
        hit &= ids[i: i + starts] == key[i]
    found = np.flatnonzero(hit)
    return int(found[-1]) + n if found.size else None
