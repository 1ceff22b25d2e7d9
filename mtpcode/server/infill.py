"""Fill-in-the-middle for models without FIM tokens.

MTP code models use the plain Llama 2 vocabulary: there is no ``<PRE>``,
``<SUF>`` or ``<MID>`` token to put the text after the cursor into the
prompt. The server therefore completes *forward* from the text before the
cursor and lets the text after it bound the completion
(:class:`mtpcode.stops.SuffixReached`): the completion ends where it reaches
the suffix's next non-blank line, or at the end of the line when the cursor's
line continues.

The prompt is built so that what changes least comes first: the extra context
chunks an editor sends (other files, in the order it keeps them), then the
text before the cursor. A keystroke changes only the end of the prompt, so the
engine's KV-prefix reuse evaluates only the last few tokens again. When the
prompt is too long for the context, whole chunks are dropped first, then the
oldest lines of the prefix, in steps of up to :data:`PREFIX_DROP_LINES` lines, so
that the cut stays at the same place from one keystroke to the next.

Clients written for other model families sometimes build a FIM prompt
themselves (``<PRE> {prefix} <SUF>{suffix} <MID>``, ``<fim_prefix>...``,
``<|fim_prefix|>...``). :func:`split_fim` recognises these marker strings and
turns them back into prefix and suffix: they are never fed to the model as
text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Lines of the prefix dropped at a time when it does not fit: a coarse step keeps the
# cut (and with it the cached KV prefix) at the same line while the user types.
PREFIX_DROP_LINES = 32
# Tokens that a prompt truncated at the token level loses at a time, for the same reason.
TOKEN_DROP_STEP = 64


# --- FIM marker strings ------------------------------------------------------------------


@dataclass(frozen=True)
class FimFamily:
    """The marker strings of one model family's fill-in-the-middle format."""

    name: str
    prefix: str
    suffix: str
    middle: str
    # CodeLlama's format puts a space after <PRE> and before <SUF>/<MID>: "<PRE> p <SUF>s <MID>".
    spaced: bool = False


FIM_FAMILIES: tuple[FimFamily, ...] = (
    FimFamily("codellama", "<PRE>", "<SUF>", "<MID>", spaced=True),
    FimFamily("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimFamily("starcoder-dash", "<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    FimFamily("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimFamily("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimFamily("deepseek-ascii", "<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),
    FimFamily("fim-begin", "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
    FimFamily("codestral", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"),
    FimFamily("codegemma", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
)

# Other special strings of those formats (repository and file separators, end markers):
# removed from prompts, since to this model they are only noise.
# Tabby's separator: its openai/completion backend renders "{prefix}<|FIM|>{suffix}".
TABBY_FIM = "<|FIM|>"

OTHER_MARKERS: tuple[str, ...] = (
    TABBY_FIM,
    "<fim_pad>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<file_sep>", "<reponame>", "<filename>",
    "<gh_stars>", "<EOT>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|file_separator|>",
)

_ALL_MARKERS = tuple(sorted({m for f in FIM_FAMILIES for m in (f.prefix, f.suffix, f.middle)} | set(OTHER_MARKERS),
                            key=len, reverse=True))
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _ALL_MARKERS))


@dataclass(frozen=True)
class FimSplit:
    """A prompt with FIM markers, taken apart. ``prefix`` includes any text the client put
    after the middle marker (what it already accepted); ``context`` is text before the
    first marker (e.g. other files a client prepends)."""

    family: str
    context: str
    prefix: str
    suffix: str


def strip_markers(text: str) -> str:
    """``text`` without any FIM or file-separator marker strings."""
    return _MARKER_RE.sub("", text)


def has_markers(text: str) -> bool:
    return _MARKER_RE.search(text) is not None


def split_fim(text: str) -> FimSplit | None:
    """Recognise a client-built FIM prompt; None if ``text`` has no prefix+suffix marker pair.

    Both orders are understood: prefix-suffix-middle (``<PRE>p<SUF>s<MID>m``)
    and suffix-prefix-middle (``<SUF>s<PRE>p<MID>m``, and the
    ``<fim_prefix><fim_suffix>s<fim_middle>p`` variant of it); so is Tabby's
    ``p<|FIM|>s``.
    """
    if TABBY_FIM in text:
        prefix, _, suffix = text.partition(TABBY_FIM)
        return FimSplit("tabby", "", strip_markers(prefix), strip_markers(suffix))
    for fam in FIM_FAMILIES:
        i_pre, i_suf = text.find(fam.prefix), text.find(fam.suffix)
        if i_pre < 0 or i_suf < 0:
            continue
        i_mid = text.find(fam.middle, max(i_pre, i_suf))
        end_pre, end_suf = i_pre + len(fam.prefix), i_suf + len(fam.suffix)
        if i_pre < i_suf:
            prefix = text[end_pre:i_suf]
            suffix = text[end_suf:i_mid] if i_mid >= 0 else text[end_suf:]
            middle = text[i_mid + len(fam.middle):] if i_mid >= 0 else ""
            if not prefix and middle:  # SPM variant: <PRE><SUF>suffix<MID>prefix
                prefix, middle = middle, ""
        else:
            suffix = text[end_suf:i_pre]
            prefix = text[end_pre:i_mid] if i_mid >= 0 else text[end_pre:]
            middle = text[i_mid + len(fam.middle):] if i_mid >= 0 else ""
        if fam.spaced:
            prefix = prefix[1:] if prefix.startswith(" ") else prefix
            prefix = prefix[:-1] if prefix.endswith(" ") else prefix
            suffix = suffix[:-1] if suffix.endswith(" ") else suffix
        context = text[: min(i_pre, i_suf)]
        return FimSplit(fam.name, strip_markers(context), strip_markers(prefix + middle), strip_markers(suffix))
    return None


# --- the prompt -------------------------------------------------------------------------

_COMMENT_BY_EXT = {
    "//": ("c", "h", "cc", "cpp", "cxx", "hpp", "hh", "java", "js", "jsx", "ts", "tsx", "go", "rs", "swift", "kt",
           "kts", "scala", "cs", "dart", "php", "zig", "v", "sv", "proto", "groovy", "m", "mm"),
    "--": ("lua", "sql", "hs", "elm", "ada", "adb", "ads", "vhd", "vhdl"),
    ";": ("lisp", "el", "clj", "scm", "asm", "s", "ini"),
    "%": ("tex", "erl", "hrl", "mat"),
    '"': ("vim",),
}
_COMMENT = {ext: mark for mark, exts in _COMMENT_BY_EXT.items() for ext in exts}


def _comment_mark(filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return _COMMENT.get(ext, "#")


@dataclass(frozen=True)
class Chunk:
    """A piece of another file that an editor sends as extra context (``input_extra``)."""

    filename: str
    text: str

    def render(self) -> str:
        """The chunk as prompt text: a comment line naming the file, then the text."""
        body = strip_markers(self.text)
        if body and not body.endswith("\n"):
            body += "\n"
        if not self.filename:
            return body + "\n"
        return f"{_comment_mark(self.filename)} {strip_markers(self.filename)}\n{body}\n"


@dataclass(frozen=True)
class InfillPrompt:
    """What to give the engine for one infill request."""

    text: str  # the prompt: chunks, then the text before the cursor
    before_cursor: str  # the (possibly truncated) text before the cursor, for the stop conditions
    truncated: bool  # chunks or prefix lines were dropped to fit the context
    chunks_used: int


class PromptTooLong(ValueError):
    """Even the cursor's own line does not fit in the context."""


def build_infill_prompt(prefix: str, chunks: Sequence[Chunk], count_tokens: Callable[[str], int],
                        budget: int) -> InfillPrompt:
    """The infill prompt for the text before the cursor ``prefix`` and extra ``chunks``.

    ``count_tokens`` counts a prompt's tokens (BOS included); ``budget`` is how
    many the prompt may have. Chunks go first (oldest first: they change least),
    then the prefix. What does not fit is dropped: whole chunks from the oldest,
    then the prefix's first lines, in steps of up to :data:`PREFIX_DROP_LINES`.
    PromptTooLong if even the prefix's last line does not fit.
    """
    prefix = strip_markers(prefix)
    rendered = [c.render() for c in chunks]
    for start in range(len(rendered) + 1):  # each prompt counted once: the fitting one is the answer
        context = "".join(rendered[start:])
        if count_tokens(context + prefix) <= budget:
            return InfillPrompt(context + prefix, prefix, start > 0, len(rendered) - start)
    # No chunk left and the prefix alone is too long: drop its oldest lines in fixed steps.
    lines = prefix.split("\n")
    last = len(lines) - 1  # the cursor's line: never dropped

    def rest(k: int) -> str:
        return "\n".join(lines[min(k, last):])

    if count_tokens(rest(last)) > budget:
        raise PromptTooLong(
            f"the line at the cursor is {count_tokens(rest(last))} tokens; the context leaves room for {budget}"
        )
    lo, hi = 1, last  # the fewest lines to drop
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(rest(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    # Drop a multiple of `step` lines (at most a quarter of what is kept): the cut then stays on
    # the same line while the text near the cursor changes.
    step = max(1, min(PREFIX_DROP_LINES, (last - lo) // 4))
    kept = rest(-(-lo // step) * step)
    return InfillPrompt(kept, kept, True, 0)


def truncate_tokens(ids: Sequence[int], budget: int, keep_first: int = 1) -> tuple[list[int], bool]:
    """Keep the first ``keep_first`` ids (BOS) and as many of the last as fit in ``budget``.

    The oldest tokens go, :data:`TOKEN_DROP_STEP` at a time, so that the cut
    is the same for prompts that only grow at the end. Returns (ids, truncated).
    """
    ids = list(ids)
    if len(ids) <= budget:
        return ids, False
    excess = len(ids) - budget
    drop = -(-excess // TOKEN_DROP_STEP) * TOKEN_DROP_STEP
    body = ids[keep_first:]
    drop = min(drop, max(0, len(body) - 1))
    return ids[:keep_first] + body[drop:], True
