"""Causal-LM plumbing every LM method shares: rows -> token ids with a response mask, and the
per-row loss (DESIGN §4.5).

The per-sample loss l_i is the mean next-token cross-entropy over the row's response tokens only:
prompt and padding carry label -100, labels are shifted by one, and the mean is taken per row,
never over a batch that mixes rows. `dyn train`, `dyn select --method grad` (influence/),
`--method slm-hard` and distillation all use these functions, so they agree on what a row's
prompt, response and loss are.

A row becomes one example in three steps:

1. `ExampleFormat` says which columns hold the prompt and the response: `prompt` + `completion`,
   chat `messages` (the response is the last assistant message, the prompt everything before it,
   rendered with the tokenizer's chat template when it has one, else as "role: content" lines), or
   `--template` for the prompt and `--response-field` for the response.
2. `build_lm_examples` tokenises prompt and response separately (so the boundary is exact),
   prepends the tokenizer's BOS token when it has one, appends EOS to the response, and truncates
   to `max_length` from the right. Rows left with no response token to predict are kept, counted by
   reason, and get no loss: they are never silently dropped.
3. `collate_lm_batch` right-pads a batch: attention mask 0 and label -100 on padding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from dyn.core.errors import DataError, UsageError

from dyn.core.text import BadText, as_text

IGNORE_INDEX = -100

# Reasons a row has no response token to learn from (reported, never silently dropped).
NO_RESPONSE_EMPTY = "empty response"
NO_RESPONSE_TRUNCATED = "prompt fills --max-length (no response token left)"
NO_RESPONSE_UNPREDICTABLE = "no predictable response token"
DEFAULT_SEPARATOR = "\n"


def per_token_losses(logits, labels):
    """Cross-entropy of each next-token prediction, (batch, seq-1), zero where the label is ignored.

    `logits` (batch, seq, vocab) predict position t+1 from position t; `labels` (batch, seq) hold
    the token ids with IGNORE_INDEX at prompt and padding positions. Computed in float32.
    """
    return next_token_losses(logits[:, :-1, :], labels[:, 1:])


def next_token_losses(logits, next_labels):
    """Float32 cross-entropy of already-shifted `logits` (batch, P, vocab) against `next_labels`
    (batch, P), zero where the label is ignored."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), next_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(next_labels.shape)


def per_row_loss(logits, labels):
    """Each row's mean loss over its own response tokens, shape (batch,), from full logits
    (batch, seq, vocab) and unshifted labels.

    Rows with no response token get NaN (callers report them; they are never silently averaged).
    """
    return mean_response_loss(logits[:, :-1, :], labels[:, 1:])


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM (or the one under a PEFT or DDP wrapper) computes logits only at given
    positions (`logits_to_keep`, a tensor of sequence indices; Hugging Face causal LMs do)."""
    import inspect

    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_logits(model, batch: dict):
    """The logits that predict response tokens, with their labels: (logits (batch, P, vocab),
    next-token labels (batch, P)).

    P are the positions t whose next token t+1 is a response token of some row in the batch. Where
    the model takes `logits_to_keep`, its output layer runs only there, so prompt positions'
    vocabulary-wide logits are never formed (with long prompts and large vocabularies that is
    much of a forward pass); otherwise all logits are computed and those positions taken."""
    import torch

    next_labels = batch["labels"][:, 1:]
    positions = torch.nonzero((next_labels != IGNORE_INDEX).any(dim=0)).squeeze(1)
    keep = takes_logits_to_keep(model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **({"logits_to_keep": positions} if keep else {})).logits
    if not keep:
        logits = logits[:, positions, :]
    return logits, next_labels[:, positions]


def mean_response_loss(logits, next_labels):
    """Each row's mean cross-entropy over its response tokens from already-shifted `logits`
    (batch, P, vocab) and `next_labels` (batch, P); NaN for rows with none. Float32."""
    import torch

    losses = next_token_losses(logits, next_labels)
    counts = (next_labels != IGNORE_INDEX).sum(dim=1)
    total = losses.sum(dim=1)
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.full_like(total, float("nan")))


def model_row_losses(model, batch: dict):
    """Forward `batch` (from `collate_lm_batch`) through a causal LM; each row's mean loss over its
    response tokens (equal to `per_row_loss` of the full logits), from `response_logits`."""
    return mean_response_loss(*response_logits(model, batch))


# --------------------------------------------------------------------------- rows -> (prompt, response)

@dataclass(frozen=True)
class ExampleFormat:
    """Where a row's prompt and response come from.

    `messages_field` set: chat rows. Otherwise the prompt is `template` formatted over the row's
    columns (empty when `template` is None) and the response is the `response_field` column;
    `separator` goes between a non-empty prompt and the response and counts as prompt.
    Saved in each checkpoint's trainer_state.json (`dyn.example_format`) so scorers rebuild the
    same examples with `ExampleFormat.from_dict`.
    """

    template: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    separator: str = DEFAULT_SEPARATOR

    def describe(self) -> str:
        if self.messages_field:
            return f"chat column '{self.messages_field}' (response = last assistant message)"
        prompt = f"prompt {self.template!r}" if self.template else "no prompt"
        return f"{prompt}, response column '{self.response_field}'"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExampleFormat":
        return cls(**{k: data.get(k) for k in ("template", "response_field", "messages_field")},
                   separator=data.get("separator", DEFAULT_SEPARATOR))


def resolve_example_format(
    columns: list[str], template: str | None, response_field: str | None, source: str,
    separator: str = DEFAULT_SEPARATOR,
) -> ExampleFormat:
    """Check the user's choice against the columns that exist, or pick a default.

    Defaults, in order: a `messages` column; `prompt` + `completion`. `--response-field` alone
    takes the prompt from a `prompt` column when there is one, else trains on the column with no
    prompt; `--template` alone takes the response from a `completion` column.
    """
    from dyn.core.text import checked_template

    def need(column: str, what: str) -> None:
        if column not in columns:
            raise DataError(f"{source}: no column '{column}' ({what}); columns are: {', '.join(columns)}")

    if template is not None:
        template, _ = checked_template(template, columns, source)
        if response_field is None:
            if "completion" not in columns:
                raise UsageError(
                    f"{source}: --template gives the prompt; name the response column with "
                    f"--response-field (columns are: {', '.join(columns)})"
                )
            response_field = "completion"
        need(response_field, "--response-field")
        return ExampleFormat(template=template, response_field=response_field, separator=separator)
    if response_field is not None:
        need(response_field, "--response-field")
        if response_field == "messages":
            return ExampleFormat(messages_field="messages")
        prompt = "{prompt}" if "prompt" in columns and response_field != "prompt" else None
        return ExampleFormat(template=prompt, response_field=response_field, separator=separator)
    if "messages" in columns:
        return ExampleFormat(messages_field="messages")
    if "prompt" in columns and "completion" in columns:
        return ExampleFormat(template="{prompt}", response_field="completion", separator=separator)
    raise UsageError(
        f"{source}: cannot tell the prompt and the response apart; expected 'prompt' + 'completion' "
        f"or 'messages' columns, or pass --template '{{a}}' --response-field B; "
        f"columns are: {', '.join(columns)}"
    )


def check_format_columns(loaded, fmt: ExampleFormat) -> None:
    """The rows (`core.io.LoadedRows`) have the columns `fmt` reads; a DataError naming the file
    otherwise."""
    from dyn.core.text import template_fields

    needed = [fmt.messages_field] if fmt.messages_field else ([*template_fields(fmt.template)] if fmt.template else []) + [fmt.response_field]
    missing = [c for c in needed if c and c not in loaded.dataset.column_names]
    if missing:
        raise DataError(
            f"{loaded.source}: no column(s) {', '.join(missing)} ({fmt.describe()}); columns are: "
            f"{', '.join(loaded.dataset.column_names)}"
        )


def split_messages(messages, tokenizer=None) -> tuple[str, str]:
    """A chat row as (prompt, response): the response is the last assistant message.

    With a chat template the prompt is everything before the reply rendered with the generation
    prompt, and the response is what the template adds for the reply (its end-of-turn marks
    included); without one, "role: content" lines and a final "assistant: ".
    """
    if not isinstance(messages, list) or not messages:
        raise BadText("'messages' is not a non-empty list of {role, content}", "malformed messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not isinstance(message.get("role"), str):
            raise BadText("a message lacks a string 'role' or 'content'", "malformed messages")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise BadText("'messages' has no assistant message to learn", "no assistant message")
    last = replies[-1]
    before, reply = messages[:last], messages[last]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True) if before else ""
        full = tokenizer.apply_chat_template(before + [reply], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, reply["content"]
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in before)
    return lines + "assistant: ", reply["content"]


def row_prompts_and_responses(
    rows, fmt: ExampleFormat, tokenizer=None, *, skip_bad_rows: bool = False
):
    """(prompts, responses, rows) for every usable row; malformed rows raise a DataError naming the
    row, or with `skip_bad_rows` are dropped and counted in `rows.skipped`."""
    from dyn.core.text import template_fields, unescape_template

    dataset = rows.dataset
    if fmt.messages_field:
        values = dataset[fmt.messages_field]

        def render(i):
            return split_messages(values[i], tokenizer)
    else:
        names = template_fields(fmt.template) if fmt.template else []
        columns = {n: dataset[n] for n in names}
        responses = dataset[fmt.response_field]

        def render(i):
            prompt = ""
            if fmt.template:
                prompt = fmt.template.format(**{n: as_text(columns[n][i], n) for n in names})
                prompt += fmt.separator
            return prompt, as_text(responses[i], fmt.response_field)

    prompts, answers = [], []
    bad = np.zeros(len(dataset), dtype=bool)
    reasons: Counter = Counter()
    for i in range(len(dataset)):
        try:
            prompt, response = render(i)
        except BadText as exc:
            if not skip_bad_rows:
                raise DataError(f"{rows.where(i)}: {exc}; fix it or pass --skip-bad-rows") from None
            bad[i] = True
            reasons[exc.reason] += 1
            continue
        prompts.append(prompt)
        answers.append(response)
    if bad.any():
        rows = rows.drop_rows(bad, reasons)
    return prompts, answers, rows


# --------------------------------------------------------------------------- token ids and labels

@dataclass
class LMExamples:
    """Token ids of every row, with where its response starts.

    `input_ids[i]`: BOS (when the tokenizer has one) + prompt + response + EOS, cut to the maximum
    length. Positions before `prompt_lengths[i]` are prompt (label -100). `response_tokens[i]` is
    how many labels the loss averages over (0: the row gets no loss; `no_response` says why).
    """

    input_ids: list[np.ndarray]
    prompt_lengths: np.ndarray
    response_tokens: np.ndarray
    truncated: np.ndarray
    no_response: Counter = field(default_factory=Counter)
    no_response_reason: list[str | None] = field(default_factory=list)
    max_length: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def with_response(self) -> np.ndarray:
        """Positions of the rows that have at least one response token (the rows that get a loss)."""
        return np.flatnonzero(self.response_tokens > 0)

    def batch(self, positions, pad_token_id: int, device=None) -> dict:
        """The rows at `positions`, collated (see `collate_lm_batch`)."""
        return collate_lm_batch(
            [self.input_ids[i] for i in positions], [int(self.prompt_lengths[i]) for i in positions],
            pad_token_id, device=device,
        )

    def figures(self) -> dict:
        return {
            "rows": len(self),
            "rows_truncated": int(self.truncated.sum()),
            "rows_without_response_tokens": dict(self.no_response),
            "response_tokens": int(self.response_tokens.sum()),
            "max_length": self.max_length,
        }


def build_lm_examples(
    rows, fmt: ExampleFormat, tokenizer, max_length: int, *, skip_bad_rows: bool = False
) -> tuple[LMExamples, object]:
    """Tokenise every row as prompt + response; returns the examples and the rows they belong to.

    Prompt and response are tokenised separately, so every prompt token is masked and every
    response token is learned, whatever the tokenizer would merge across the boundary.
    """
    if max_length < 2:
        raise UsageError(f"--max-length {max_length}: must be at least 2")
    prompts, responses, rows = row_prompts_and_responses(rows, fmt, tokenizer, skip_bad_rows=skip_bad_rows)
    return encode_prompt_response(prompts, responses, tokenizer, max_length), rows


def encode_prompt_response(prompts: list[str], responses: list[str], tokenizer, max_length: int) -> LMExamples:
    """Token ids, prompt lengths and response-token counts for parallel prompt/response lists."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt_ids = _token_ids(tokenizer, prompts)
    response_ids = _token_ids(tokenizer, responses)
    ids_out, prompt_lengths, counts, truncated, reasons_list = [], [], [], [], []
    reasons: Counter = Counter()
    for prompt, response, p_ids, r_ids in zip(prompts, responses, prompt_ids, response_ids):
        if bos is not None and not (p_ids or r_ids)[:1] == [bos]:
            p_ids = [bos] + p_ids
        empty = not response.strip()
        if eos is not None and not r_ids[-1:] == [eos]:
            r_ids = r_ids + [eos]
        ids = p_ids + r_ids
        cut = len(ids) > max_length
        ids = ids[:max_length]
        # Labels are shifted by one: position 0 is never a target, so a response that starts at
        # position 0 (no prompt, no BOS) loses its first token.
        count = max(0, len(ids) - max(len(p_ids), 1))
        reason = None
        if empty:
            reason, count = NO_RESPONSE_EMPTY, 0
        elif count == 0:
            reason = NO_RESPONSE_TRUNCATED if cut else NO_RESPONSE_UNPREDICTABLE
        if reason:
            reasons[reason] += 1
        ids_out.append(np.asarray(ids, dtype=np.int64))
        prompt_lengths.append(min(len(p_ids), len(ids)) if count else len(ids))
        counts.append(count)
        truncated.append(cut)
        reasons_list.append(reason)
    return LMExamples(
        input_ids=ids_out,
        prompt_lengths=np.asarray(prompt_lengths, dtype=np.int64),
        response_tokens=np.asarray(counts, dtype=np.int64),
        truncated=np.asarray(truncated, dtype=bool),
        no_response=reasons,
        no_response_reason=reasons_list,
        max_length=max_length,
    )


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), 4096):
        chunk = texts[start:start + 4096]
        encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        ids.extend(list(x) for x in encoded["input_ids"])
    return ids


def collate_lm_batch(sequences, prompt_lengths, pad_token_id: int, device=None) -> dict:
    """Right-pad a batch: `input_ids`, `attention_mask` (0 on padding) and `labels` (the ids, with
    -100 on the prompt and on padding), each (rows, longest) int64 tensors."""
    import torch

    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length: len(ids)] = ids[prompt_length:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def left_padded(prompt_ids, pad_token_id: int, device=None) -> dict:
    """Left-pad prompts for generation: `input_ids` and `attention_mask` (0 on padding), every prompt
    ending at the last column, so new tokens follow each one directly (`collate_lm_batch` pads on
    the right, for training)."""
    import torch

    longest = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), longest), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if len(ids):
            input_ids[row, longest - len(ids):] = torch.as_tensor(np.asarray(ids), dtype=torch.long)
            attention_mask[row, longest - len(ids):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
