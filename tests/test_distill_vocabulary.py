"""The teacher/student vocabulary check (distill/vocabulary.py): real tokenizers trained here, tiny
GPT-2 models built from config."""

import pytest

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import IGNORE_INDEX
from dyn.core.tokenizer_training import tokenizer_json, train_bpe_tokenizer, wrap_tokenizer
from dyn.distill.teacher_cache import TeacherTopK
from dyn.distill.vocabulary import (
    SharedVocabulary,
    check_label_ids,
    check_vocabularies,
    output_rows,
    restrict_logits,
    restrict_top_k,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TEXT_A = ["the cat sat on the mat and the dog sat on the log"] * 20
TEXT_B = ["zebras quickly jump over lazy foxes in winter fields"] * 20


@pytest.fixture(scope="module")
def tokenizer_json_a():
    return tokenizer_json(train_bpe_tokenizer(TEXT_A, 300))


@pytest.fixture
def tokenizer_a(tokenizer_json_a):
    """A fresh copy each time, so a test may add tokens to it."""
    return wrap_tokenizer(tokenizer_json_a)


@pytest.fixture(scope="module")
def tokenizer_b():
    return train_bpe_tokenizer(TEXT_B, 300)


def with_pad(tokenizer):
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# --------------------------------------------------------------------------- check_vocabularies

def test_same_tokenizer_equal_widths_shares_everything(tokenizer_a, tokenizer_json_a):
    n = len(tokenizer_a)
    shared = check_vocabularies(tokenizer_a, wrap_tokenizer(tokenizer_json_a), teacher_rows=n, student_rows=n)
    assert shared == SharedVocabulary(size=n, tokenizer_size=n, teacher_rows=n, student_rows=n, notice=None)


def test_same_tokenizer_padded_widths_truncate_to_the_narrower(tokenizer_a):
    n = len(tokenizer_a)
    shared = check_vocabularies(tokenizer_a, tokenizer_a, teacher_rows=n + 40, student_rows=n + 8)
    assert (shared.size, shared.tokenizer_size) == (n + 8, n)
    assert f"{n + 40}" in shared.notice and f"{n + 8}" in shared.notice and "padding" in shared.notice
    same = check_vocabularies(tokenizer_a, tokenizer_a, teacher_rows=n + 8, student_rows=n + 8)
    assert (same.size, same.notice) == (n + 8, None)


@pytest.fixture(scope="module")
def small_tokenizer():
    """A tokenizer of fewer than 100 ids: 256 bytes are always in a BPE, so build it directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    return wrap_tokenizer(backend)


def test_narrow_tokenizer_widths_100_and_128(small_tokenizer):
    shared = check_vocabularies(small_tokenizer, small_tokenizer, teacher_rows=128, student_rows=100)
    assert (shared.size, shared.tokenizer_size, shared.teacher_rows, shared.student_rows) == (100, 29, 128, 100)
    assert shared.notice == ("the teacher has 128 output rows and the student 100; the loss uses the 100 ids "
                             "they share (the rest are padding rows no text produces)")


def test_rows_fewer_than_the_tokenizer_is_a_usage_error(tokenizer_a):
    n = len(tokenizer_a)
    with pytest.raises(UsageError, match=f"the student has {n - 1} output rows, fewer than its tokenizer's {n} ids"):
        check_vocabularies(tokenizer_a, tokenizer_a, teacher_rows=n, student_rows=n - 1)
    with pytest.raises(UsageError, match="teacher runs/t has"):
        check_vocabularies(tokenizer_a, tokenizer_a, teacher_rows=n - 1, student_rows=n, teacher_name="teacher runs/t")


def test_appended_pad_token_is_padding(tokenizer_a, tokenizer_json_a):
    n = len(tokenizer_a)
    student = with_pad(wrap_tokenizer(tokenizer_json_a))
    assert len(student) == n + 1 and student.pad_token_id == n
    shared = check_vocabularies(tokenizer_a, student, teacher_rows=n, student_rows=n + 1)
    assert (shared.size, shared.tokenizer_size) == (n, n)
    assert "appends 1 special token" in shared.notice and "the student" in shared.notice
    # The other way round, with padded widths on both sides: still the shorter tokenizer's ids.
    shared = check_vocabularies(student, tokenizer_a, teacher_rows=n + 64, student_rows=n + 64)
    assert shared.size == n and shared.notice == (
        f"the teacher has {n + 64} output rows and the student {n + 64}; the loss uses the {n} ids they share "
        f"(the tokenizer of the teacher appends 1 special token after them; the rows past them are not used)"
    )


def test_another_tokenizer_is_refused_at_the_first_difference(tokenizer_a, tokenizer_b):
    n_a, n_b = len(tokenizer_a), len(tokenizer_b)
    with pytest.raises(DataError) as caught:
        check_vocabularies(tokenizer_a, tokenizer_b, teacher_rows=n_a, student_rows=n_b)
    message = str(caught.value)
    vocab_a = {i: t for t, i in tokenizer_a.get_vocab().items()}
    vocab_b = {i: t for t, i in tokenizer_b.get_vocab().items()}
    first = next(i for i in range(min(n_a, n_b)) if vocab_a.get(i) != vocab_b.get(i))
    assert f"differ at id {first}: {vocab_a[first]!r} for the teacher, {vocab_b[first]!r} for the student" in message
    assert f"the teacher {n_a} ids, the student {n_b}" in message
    assert "must use the tokenizer of the teacher" in message and "\n" not in message


def test_appended_ordinary_token_is_refused(tokenizer_a, tokenizer_json_a):
    n = len(tokenizer_a)
    student = wrap_tokenizer(tokenizer_json_a)
    student.add_tokens(["<extra-token>"])
    with pytest.raises(DataError, match=f"has id {n} '<extra-token>' past the other's {n} ids, and it is not an added special token"):
        check_vocabularies(tokenizer_a, student, teacher_rows=n, student_rows=n + 1)


def test_different_special_token_is_refused(tokenizer_a, tokenizer_json_a):
    n = len(tokenizer_a)
    student = wrap_tokenizer(tokenizer_json_a)
    student.add_special_tokens({"eos_token": "<end>"})
    with pytest.raises(DataError, match=r"their eos tokens differ: '<\|eos\|>' \(id 1\) for the teacher, '<end>' \(id %d\)" % n):
        check_vocabularies(tokenizer_a, student, teacher_rows=n, student_rows=n + 1)


# --------------------------------------------------------------------------- output_rows

def _gpt2(vocab_size: int, tie: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config)


def test_output_rows_reads_the_head():
    import torch
    from transformers import GPT2Model

    tied = _gpt2(128, tie=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight and output_rows(tied) == 128
    untied = _gpt2(100, tie=False)
    assert output_rows(untied) == 100
    untied.lm_head = torch.nn.Linear(8, 136, bias=False)  # a head padded past the config's vocabulary
    assert untied.config.vocab_size == 100 and output_rows(untied) == 136
    assert untied(torch.zeros((1, 3), dtype=torch.long)).logits.shape[-1] == 136
    assert output_rows(GPT2Model(tied.config)) == 128  # no head: the config's vocab_size


# --------------------------------------------------------------------------- restrict_logits

def _shared(size, teacher_rows, student_rows=None):
    student_rows = size if student_rows is None else student_rows
    return SharedVocabulary(size, size, teacher_rows, student_rows, None)


def test_restrict_logits_is_a_view_of_the_shared_columns():
    import torch

    logits = torch.randn(2, 5, 128)
    narrowed = restrict_logits(logits, _shared(100, 128))
    assert narrowed.shape == (2, 5, 100) and narrowed.data_ptr() == logits.data_ptr()
    assert torch.equal(narrowed, logits[..., :100])
    assert restrict_logits(logits, _shared(128, 128)) is logits
    with pytest.raises(UsageError, match="fewer than the 130 shared"):
        restrict_logits(logits, _shared(130, 130))


# --------------------------------------------------------------------------- restrict_top_k

def _top_k(ids):
    import torch

    ids = torch.tensor(ids, dtype=torch.long)
    log_probs = torch.log_softmax(torch.randn(ids.shape), dim=-1).sort(dim=-1, descending=True).values - 1.0
    return TeacherTopK(log_probs, ids, torch.full((ids.shape[0],), -0.5))


def test_restrict_top_k_accepts_ids_inside_the_shared_vocabulary():
    teacher = _top_k([[3, 99, 7], [0, 1, 2]])
    assert restrict_top_k(teacher, _shared(100, 128)) is teacher
    wide = _top_k([[120, 3, 4]])
    assert restrict_top_k(wide, _shared(128, 128)) is wide  # size == teacher width: nothing to restrict


def test_restrict_top_k_refuses_padding_ids():
    import torch

    teacher = _top_k([[3, 4, 5], [7, 8, 9], [1, 110, 100]])
    with pytest.raises(DataError, match=r"^entry 2: the teacher's top-k holds padding id 110 \(>= the shared 100 ids\); rebuild the cache"):
        restrict_top_k(teacher, _shared(100, 128))
    teacher.log_probs[2, 1:] = float("-inf")  # even with no mass: a fixed-k support cannot drop it
    with pytest.raises(DataError, match="row 12, token 2: .*online teacher"):
        restrict_top_k(teacher, _shared(100, 128), where=lambda position: f"row 12, token {position}")
    # A top-k taken from restricted logits always passes.
    from dyn.distill.teacher_cache import top_k_from_logits

    logits = torch.randn(1, 4, 128)
    logits[..., 100:] = 50.0  # padding rows the teacher would rank first
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    shared = _shared(100, 128)
    with pytest.raises(DataError, match="padding id"):
        restrict_top_k(top_k_from_logits(logits, labels, 8), shared)
    top = top_k_from_logits(restrict_logits(logits, shared), labels, 8)
    assert restrict_top_k(top, shared) is top and int(top.ids.max()) < 100


# --------------------------------------------------------------------------- check_label_ids

def test_check_label_ids_refuses_ids_past_the_shared_vocabulary(tokenizer_a, tokenizer_json_a):
    import torch

    n = len(tokenizer_a)
    student = with_pad(wrap_tokenizer(tokenizer_json_a))
    shared = check_vocabularies(tokenizer_a, student, teacher_rows=n, student_rows=n + 1)
    labels = torch.tensor([[IGNORE_INDEX] + student("the cat").input_ids + [student.pad_token_id]])
    labels[0, -1] = IGNORE_INDEX  # padding is never counted
    check_label_ids(labels, shared)
    spelled = torch.tensor([[IGNORE_INDEX] + student("the <pad> cat").input_ids])
    assert int(spelled.max()) == n
    with pytest.raises(DataError, match=f"token id {n} is outside the {n} ids"):
        check_label_ids(spelled, shared)
