"""Held-out evaluation of a causal LM during training (`--eval-data FILE --eval-every N
--eval-metric M`, in `dyn distill` and `dyn train`).

The held-out rows are tokenised exactly like the training rows (`core.lm.build_lm_examples`), so
`eval_loss` is the training objective itself: the mean over rows of each row's mean response-token
cross-entropy (`core.lm.model_row_losses`), over the rows that have at least one response token.

`exact-match` and `final-answer` also generate greedily from each row's prompt tokens and compare
the decoded text with the row's response (`answers_match`). Generation is batched with left
padding; `generate` derives position ids from the attention mask, so a padded row gets the same
tokens as when it runs alone (the tests check this against a one-at-a-time, cache-free loop).

Several processes: the loss and generation batches are planned once over all rows and shared out
by rank (`core.lm_batches.map_batches`), so every rank returns the same figures as one process
would, bit for bit. Every rank must call `evaluate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

import numpy as np

from dyn.core.errors import DataError, UsageError

EVAL_METRICS = ("loss", "exact-match", "final-answer")
DEFAULT_MAX_NEW_TOKENS = 256
FINAL_ANSWER_MARK = "####"
_WHITESPACE = re.compile(r"\s+")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


@dataclass
class HeldOutSet:
    """The held-out rows, tokenised as for training, with each row's response text to compare
    generations against. `tokenizer` decodes generations (set by `load_held_out`)."""

    examples: "LMExamples"  # noqa: F821 - core.lm.LMExamples
    references: list[str]
    where: Callable[[int], str]
    source: str
    rows_in: int
    tokenizer: object = None

    def __len__(self) -> int:
        return len(self.examples)


def check_metric(metric: str) -> str:
    """`metric` when it is one of EVAL_METRICS; a usage error otherwise."""
    if metric not in EVAL_METRICS:
        raise UsageError(f"--eval-metric {metric}: unknown metric; choose one of {', '.join(EVAL_METRICS)}")
    return metric


def load_held_out(path: str, fmt, tokenizer, max_length: int, *, split=None, skip_bad_rows=False) -> HeldOutSet:
    """Read and tokenise the held-out file in the training rows' format `fmt` (`core.lm.ExampleFormat`).

    A data error when no row keeps a response token (nothing to evaluate).
    """
    from dyn.core.io import read_rows
    from dyn.core.lm import check_format_columns, encode_prompt_response, row_prompts_and_responses

    if max_length < 2:
        raise UsageError(f"--max-length {max_length}: must be at least 2")
    loaded = read_rows(path, skip_bad_rows=skip_bad_rows, split=split)
    check_format_columns(loaded, fmt)
    # build_lm_examples without losing the response texts: the same two steps it takes.
    prompts, responses, loaded = row_prompts_and_responses(loaded, fmt, tokenizer, skip_bad_rows=skip_bad_rows)
    examples = encode_prompt_response(prompts, responses, tokenizer, max_length)
    if not (examples.response_tokens > 0).any():
        reasons = ", ".join(f"{n} {reason}" for reason, n in examples.no_response.items()) or "no usable rows"
        raise DataError(f"{loaded.source}: no held-out row has a response token to evaluate ({reasons})")
    return HeldOutSet(examples, responses, loaded.where, loaded.source, loaded.rows_in_source or len(responses), tokenizer)


def evaluate(model, held_out: HeldOutSet, *, metric: str = "loss", pad_token_id: int, device,
             batch_tokens: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """The model's figures on the held-out rows: `eval_loss`, `eval_rows`, `eval_rows_without_response`
    and, for exact-match / final-answer, `eval_exact_match` (fraction of generated rows whose greedy
    generation matches) and `eval_generated_rows`.

    Runs in eval mode without gradients and puts the model back in the mode it was in. Rows with no
    response token (empty, or the prompt fills --max-length) get no loss and are not generated.
    """
    import torch

    check_metric(metric)
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    examples = held_out.examples
    scored = np.flatnonzero(examples.response_tokens > 0)
    generating = metric != "loss"
    if generating:
        if held_out.tokenizer is None:
            raise ValueError("HeldOutSet.tokenizer is needed to decode generations")
        if metric == "final-answer":
            _check_final_answers(held_out, scored)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = _row_losses(model, held_out, pad_token_id, device, batch_tokens)
            figures = {
                "eval_loss": float(np.mean(losses[scored], dtype=np.float64)) if len(scored) else math.nan,
                "eval_rows": int(len(scored)),
                "eval_rows_without_response": int(len(examples) - len(scored)),
            }
            if generating:
                texts = _generated_texts(model, held_out, scored, pad_token_id, device, batch_tokens, max_new_tokens) if len(scored) else {}
                hits = sum(answers_match(texts[i], held_out.references[i], metric) for i in scored)
                figures["eval_exact_match"] = hits / len(scored) if len(scored) else math.nan
                figures["eval_generated_rows"] = int(len(scored))
    finally:
        model.train(was_training)
    return figures


# --------------------------------------------------------------------------- comparing answers

def answers_match(generated: str, reference: str, metric: str) -> bool:
    """Whether a generation answers like the reference.

    `exact-match`: equal after stripping and collapsing whitespace runs to one space.
    `final-answer` (GSM8K's convention): the text after the last "####" of each, stripped, with
    commas inside numbers removed; compared as numbers when both are plain numbers ("72" equals
    "72.0"), else as text. A generation without "####" never matches.
    """
    if metric == "exact-match":
        return _collapse(generated) == _collapse(reference)
    if metric != "final-answer":
        check_metric(metric)
        raise UsageError(f"--eval-metric {metric}: compares no generations")
    expected = final_answer(reference)
    if expected is None:
        raise DataError(f"reference {reference[:60]!r}: no '{FINAL_ANSWER_MARK}' final answer")
    got = final_answer(generated)
    if got is None:
        return False
    if _PLAIN_NUMBER.fullmatch(got) and _PLAIN_NUMBER.fullmatch(expected):
        return Decimal(got) == Decimal(expected)
    return _collapse(got) == _collapse(expected)


def final_answer(text: str) -> str | None:
    """The text after the last "####", stripped, commas inside numbers removed; None without one."""
    if FINAL_ANSWER_MARK not in text:
        return None
    return _COMMA_IN_NUMBER.sub("", text.rsplit(FINAL_ANSWER_MARK, 1)[1].strip())


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text.strip())


def _check_final_answers(held_out: HeldOutSet, rows: np.ndarray) -> None:
    for i in rows:
        if FINAL_ANSWER_MARK not in held_out.references[i]:
            raise DataError(
                f"{held_out.where(int(i))}: the response has no '{FINAL_ANSWER_MARK}' final answer, which "
                f"--eval-metric final-answer compares; use --eval-metric exact-match"
            )


# --------------------------------------------------------------------------- loss

def _budget(batch_tokens: int | None, device, longest: int) -> int:
    from dyn.core.lm_batches import default_batch_tokens

    return batch_tokens if batch_tokens is not None else max(default_batch_tokens(device), longest)


def _row_losses(model, held_out: HeldOutSet, pad_token_id: int, device, batch_tokens: int | None) -> np.ndarray:
    """Every row's `per_row_loss` (NaN for rows without a response token), on every rank."""
    from dyn.core.lm import model_row_losses
    from dyn.core.lm_batches import map_batches, plan_row_batches

    examples = held_out.examples
    longest = int(examples.lengths.max())
    rows = plan_row_batches(examples, pad_token_id, held_out.where, _budget(batch_tokens, device, longest),
                            device=str(device))
    parts = map_batches(rows, lambda j, batch: model_row_losses(model, batch).float().cpu().numpy(), "held-out loss")
    losses = np.full(len(examples), np.nan, dtype=np.float32)
    for positions, values in zip(rows.batches, parts):
        losses[positions] = values
    return losses


# --------------------------------------------------------------------------- generation

class _Prompts:
    """Prompt token ids to generate from, in the shape `plan_row_batches` plans over: a row's
    length is its prompt plus the tokens it may generate, and a batch is left-padded."""

    def __init__(self, prompt_ids: list[np.ndarray], new_tokens: int):
        self.prompt_ids = prompt_ids
        self.new_tokens = new_tokens

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(p) + self.new_tokens for p in self.prompt_ids], dtype=np.int64)

    def batch(self, positions, pad_token_id: int, device=None) -> dict:
        from dyn.core.lm import left_padded

        return left_padded([self.prompt_ids[i] for i in positions], pad_token_id, device)


def generate_greedy(model, batch: dict, *, max_new_tokens: int, pad_token_id: int, stop_ids: list[int]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch (`core.lm.left_padded`), each cut before its first stop token.

    `generate` takes the position ids from the attention mask, so a left-padded row continues
    exactly as it would alone.
    """
    from transformers import GenerationConfig

    # generate() fills every setting left None from the model's own generation_config (a saved model
    # may carry a repetition penalty or a minimum length), so whatever changes a greedy choice is set.
    config = GenerationConfig(
        do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        min_new_tokens=0, max_new_tokens=max_new_tokens, num_return_sequences=1,
        pad_token_id=int(pad_token_id), eos_token_id=list(stop_ids),
    )
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config)
    continuations = []
    for row in out[:, batch["input_ids"].shape[1]:].cpu().tolist():
        end = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        continuations.append(row[:end])
    return continuations


def _generated_texts(model, held_out: HeldOutSet, rows: np.ndarray, pad_token_id: int, device,
                     batch_tokens: int | None, max_new_tokens: int) -> dict[int, str]:
    """Row -> decoded greedy generation for `rows`, on every rank."""
    from dyn.core.lm_batches import map_batches, plan_row_batches
    from dyn.core.models import context_length
    from dyn.distill.generations import eos_ids

    examples, tokenizer = held_out.examples, held_out.tokenizer
    prompt_ids = [examples.input_ids[i][: int(examples.prompt_lengths[i])] for i in rows]
    longest_prompt = max(len(p) for p in prompt_ids)
    # One cap for every row (so batching never changes a row's generation): no position past the context.
    new_tokens = min(max_new_tokens, context_length(model.config) - longest_prompt)
    if new_tokens < 1:
        raise UsageError(
            f"{held_out.source}: a prompt of {longest_prompt} tokens leaves no room to generate in the model's "
            f"context of {context_length(model.config)} positions; lower --max-length"
        )
    prompts = _Prompts(prompt_ids, new_tokens)
    plan = plan_row_batches(prompts, pad_token_id, lambda k: held_out.where(int(rows[k])),
                            max(_budget(batch_tokens, device, 0), int(prompts.lengths.max())), device=str(device))
    stops = eos_ids(model, tokenizer)
    parts = map_batches(
        plan,
        lambda j, batch: [tokenizer.decode(t, skip_special_tokens=True) for t in generate_greedy(
            model, batch, max_new_tokens=new_tokens, pad_token_id=pad_token_id, stop_ids=stops)],
        "held-out generation",
    )
    texts: dict[int, str] = {}
    for positions, decoded in zip(plan.batches, parts):
        for k, text in zip(positions, decoded):
            texts[int(rows[k])] = text
    return texts
