"""The teacher/student vocabulary check that runs before any distillation (DESIGN §4.4): the two
must mean the same thing by the same token id, except for padding, and the losses then run over
the ids they share.

A distillation loss compares two distributions id by id, so id i must be the same token for both
models. What may differ is padding: rows of an output embedding that no text produces (widths
rounded up to a multiple of 64, say), or special tokens appended to one tokenizer (a `<pad>`
added after training) that never appear at a counted position. `check_vocabularies` decides
whether a pair is usable and how many ids the loss covers; `restrict_logits`, `restrict_top_k`
and `check_label_ids` then keep every tensor inside those ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX

if TYPE_CHECKING:
    from dyn.distill.teacher_cache import TeacherTopK

# The special tokens whose ids the data pipeline writes into token sequences; the padding token is
# left out on purpose: padded positions are never counted, so two tokenizers may pad differently.
_COMPARED_SPECIALS = ("bos", "eos", "unk")


@dataclass(frozen=True)
class SharedVocabulary:
    """The ids a teacher and a student share: the loss is over ids [0, size).

    `tokenizer_size`: the ids both tokenizers have, meaning the same token (the shorter one's
    length when they differ by appended special tokens). `teacher_rows` / `student_rows`: each
    model's logits width. `notice`: one line to print when something is truncated (size below
    either width); None when both widths equal `size`.
    """

    size: int
    tokenizer_size: int
    teacher_rows: int
    student_rows: int
    notice: str | None


def check_vocabularies(teacher_tokenizer, student_tokenizer, *, teacher_rows: int, student_rows: int,
                       teacher_name: str = "the teacher", student_name: str = "the student") -> SharedVocabulary:
    """The ids a teacher and a student share, or an error before anything runs.

    Rules, in order:

    1. The tokenizers must agree. Identical (`tokenizer_sha256` equal), or differing only by
       special tokens appended to one of them: the same token at every id below the shorter
       length, the same bos/eos/unk ids, and every id beyond the shorter length an added special
       token of the longer one (the padding token may differ: padded positions are never counted).
       Anything else is a DataError naming the first difference (an id whose token differs, a
       special token, or an appended token that is not special): the student has to use the
       teacher's tokenizer.
    2. Each model's logits must cover its own tokenizer: rows >= len(tokenizer), else UsageError.
    3. size, the ids the loss covers, is the longest prefix of ids that mean the same to both,
       capped by both widths. Same vocabulary (same length): size = min(teacher_rows,
       student_rows); rows past the tokenizer are padding of both models, which no text produces.
       Appended special tokens: size = the shorter tokenizer's length; the longer one's extra ids
       are tokens the other model has no row for (or only a padding row), so they are cut, and
       with them any padding rows past them. Text that spells such a token out literally still
       tokenises to it; `check_label_ids` refuses those labels.

    `notice` says what was cut whenever size is below either width.
    """
    from dyn.distill.teacher_cache import tokenizer_sha256

    teacher_size, student_size = len(teacher_tokenizer), len(student_tokenizer)
    same = tokenizer_sha256(teacher_tokenizer) == tokenizer_sha256(student_tokenizer)
    if not same:
        problem = _tokenizer_difference(teacher_tokenizer, student_tokenizer, teacher_name, student_name)
        if problem is not None:
            raise DataError(
                f"{student_name} and {teacher_name} use different tokenizers ({teacher_name} {teacher_size} ids, "
                f"{student_name} {student_size}): {problem}; {student_name} must use the tokenizer of "
                f"{teacher_name} (e.g. a fresh student built with the teacher's tokenizer)"
            )
    for name, rows, size in ((teacher_name, teacher_rows, teacher_size), (student_name, student_rows, student_size)):
        if rows < size:
            raise UsageError(f"{name} has {rows} output rows, fewer than its tokenizer's {size} ids")

    tokenizer_size = min(teacher_size, student_size)
    if teacher_size == student_size:
        size = min(teacher_rows, student_rows)
    else:
        size = tokenizer_size
    notice = None
    if size < teacher_rows or size < student_rows:
        widths = f"{teacher_name} has {teacher_rows} output rows and {student_name} {student_rows}"
        if teacher_size == student_size:
            why = "the rest are padding rows no text produces"
        else:
            longer = teacher_name if teacher_size > student_size else student_name
            extra = abs(teacher_size - student_size)
            why = (f"the tokenizer of {longer} appends {extra} special token{'s' if extra != 1 else ''} "
                   f"after them; the rows past them are not used")
        notice = f"{widths}; the loss uses the {size} ids they share ({why})"
    return SharedVocabulary(size, tokenizer_size, int(teacher_rows), int(student_rows), notice)


def output_rows(model) -> int:
    """Width of a causal LM's logits: its output embedding's rows, else `config.vocab_size` (a
    model without a separate head). The head is read first because a resized or padded head is
    what the logits come from, whatever the config says."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        weight = getattr(head, "weight", None)
        if weight is not None:
            return int(weight.shape[0])
        if hasattr(head, "out_features"):
            return int(head.out_features)
    return int(model.config.vocab_size)


def restrict_logits(logits, shared: SharedVocabulary):
    """`logits[..., :size]`, a view (the same tensor when already that width). UsageError when the
    logits are narrower than the shared ids: they are not from either checked model."""
    width = int(logits.shape[-1])
    if width == shared.size:
        return logits
    if width < shared.size:
        raise UsageError(f"logits have {width} columns, fewer than the {shared.size} shared vocabulary ids")
    return logits[..., : shared.size]


def restrict_top_k(teacher: "TeacherTopK", shared: SharedVocabulary, where: Callable[[int], str] | None = None) -> "TeacherTopK":
    """A teacher's top-k (online or cached) checked against the shared ids, returned unchanged.

    When size equals the teacher's width there is nothing to restrict (the losses check ids against
    the student's vocabulary anyway). Otherwise every id must lie below size. A padding id in a
    top-k cannot be dropped: the support is a fixed k distinct ids per position, and replacing it
    would invent a teacher probability. So any id >= size, whatever its log-probability, is a
    DataError naming the first such position (`where(position)` describes it, position being the
    entry's index in the compact layout). The teacher's mass on padding rows it did not rank stays
    in the tail, where it belongs: the student has no such ids either. A top-k computed from
    `restrict_logits(teacher_logits, shared)` never fails this check.
    """
    if shared.size >= shared.teacher_rows or teacher.ids.numel() == 0:
        return teacher
    outside = (teacher.ids >= shared.size).any(dim=-1)
    if not bool(outside.any()):
        return teacher
    position = int(outside.nonzero()[0, 0])
    padding_id = int(teacher.ids[position][teacher.ids[position] >= shared.size][0])
    place = where(position) if where is not None else f"entry {position}"
    raise DataError(
        f"{place}: the teacher's top-k holds padding id {padding_id} (>= the shared {shared.size} ids); "
        f"rebuild the cache from a teacher whose output width matches, or use the online teacher"
    )


def check_label_ids(labels, shared: SharedVocabulary, where: Callable[[int], str] | None = None) -> None:
    """DataError when a counted label (not IGNORE_INDEX) is outside [0, size): an appended special
    token of the longer tokenizer spelled out in the text, which the shared logits have no column
    for. `where(index)` describes the flat index of the first one."""
    flat = labels.reshape(-1)
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= shared.size))
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0, 0])
    place = where(index) if where is not None else f"label {index}"
    raise DataError(
        f"{place}: token id {int(flat[index])} is outside the {shared.size} ids teacher and student share "
        f"(a special token only one tokenizer has, written out in the text?)"
    )


def _tokenizer_difference(teacher, student, teacher_name: str, student_name: str) -> str | None:
    """The first thing that makes the two tokenizers unusable together, in words; None when they
    differ only by padding (see `check_vocabularies`)."""
    teacher_tokens, student_tokens = _tokens_by_id(teacher), _tokens_by_id(student)
    shorter = min(len(teacher), len(student))
    for token_id in range(shorter):
        a, b = teacher_tokens.get(token_id), student_tokens.get(token_id)
        if a != b:
            return f"they first differ at id {token_id}: {a!r} for {teacher_name}, {b!r} for {student_name}"
    for special in _COMPARED_SPECIALS:
        a, b = getattr(teacher, f"{special}_token_id", None), getattr(student, f"{special}_token_id", None)
        if a != b:
            return (f"their {special} tokens differ: {getattr(teacher, f'{special}_token', None)!r} (id {a}) "
                    f"for {teacher_name}, {getattr(student, f'{special}_token', None)!r} (id {b}) for {student_name}")
    if len(teacher) > len(student):
        longer, name, tokens = teacher, teacher_name, teacher_tokens
    else:
        longer, name, tokens = student, student_name, student_tokens
    added = getattr(longer, "added_tokens_decoder", {}) or {}
    special_ids = set(getattr(longer, "all_special_ids", []) or [])
    for token_id in range(shorter, len(longer)):
        token = added.get(token_id)
        if token is None or not (getattr(token, "special", False) or token_id in special_ids):
            return (f"the tokenizer of {name} has id {token_id} {tokens.get(token_id)!r} past the other's "
                    f"{shorter} ids, and it is not an added special token")
    return None


def _tokens_by_id(tokenizer) -> dict[int, str]:
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}
