"""Rows -> causal-LM examples, labels, per-row loss, tokenizer training and model loading
(core/lm.py, core/models.py, core/tokenizer_training.py), on tiny models built here and GSM8K rows."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dyn.core.errors import DataError, UsageError
from dyn.core.lm import (
    IGNORE_INDEX, NO_RESPONSE_EMPTY, NO_RESPONSE_TRUNCATED, ExampleFormat, build_lm_examples,
    collate_lm_batch, encode_prompt_response, model_row_losses, pad_token_id, per_row_loss, takes_logits_to_keep,
    resolve_example_format, split_messages,
)

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k-train.jsonl"


def gsm8k_rows(n: int) -> list[dict]:
    if not GSM8K.exists():
        pytest.skip(f"real data not found at {GSM8K}")
    with open(GSM8K, encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


@pytest.fixture(scope="module")
def rows():
    return gsm8k_rows(24)


@pytest.fixture(scope="module")
def tokenizer(rows):
    from dyn.core.tokenizer_training import train_bpe_tokenizer

    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    return train_bpe_tokenizer(texts, vocab_size=400, model_max_length=256)


@pytest.fixture(scope="module")
def model(tokenizer):
    from dyn.core.models import ModelSource, build_fresh_model, fresh_config

    source = ModelSource("config", "test", {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 512})
    model = build_fresh_model(fresh_config(source, tokenizer), seed=0, attn_implementation="eager")
    return model.eval()


def loaded_rows(rows: list[dict], source: str = "rows.jsonl"):
    """Rows as `read_rows` returns them, without a file."""
    import datasets
    import pyarrow as pa

    from dyn.core.io import LoadedRows

    n = len(rows)
    return LoadedRows(datasets.Dataset(pa.Table.from_pylist(rows)), source, "jsonl", np.arange(n), np.arange(1, n + 1), Counter(), n)


def hand_row_loss(model, ids: np.ndarray, prompt_length: int) -> float:
    """The row alone, no padding: mean of -log p(token t | tokens < t) over response positions t >= 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    terms = [-float(log_probs[t - 1, int(ids[t])]) for t in range(max(prompt_length, 1), len(ids))]
    return sum(terms) / len(terms)


def test_labels_mask_prompt_and_padding_and_loss_matches_hand_computation(rows, tokenizer, model):
    fmt = ExampleFormat(template="{question}", response_field="answer")
    examples, _ = build_lm_examples(loaded_rows(rows[:8]), fmt, tokenizer, max_length=512)
    batch = examples.batch(range(8), pad_token_id(tokenizer))
    labels, mask, ids = batch["labels"], batch["attention_mask"], batch["input_ids"]
    for i in range(8):
        n, p = len(examples.input_ids[i]), int(examples.prompt_lengths[i])
        assert ids[i, 0] == tokenizer.bos_token_id and examples.input_ids[i][-1] == tokenizer.eos_token_id
        assert (labels[i, :p] == IGNORE_INDEX).all(), "prompt positions carry no label"
        assert (labels[i, n:] == IGNORE_INDEX).all() and (mask[i, n:] == 0).all(), "right padding, masked"
        assert torch.equal(labels[i, p:n], ids[i, p:n]) and (mask[i, :n] == 1).all()
        assert tokenizer.decode(examples.input_ids[i][p:-1]) == rows[i]["answer"]
        assert tokenizer.decode(examples.input_ids[i][1:p]) == rows[i]["question"] + "\n"
        assert examples.response_tokens[i] == n - p
    assert len(set(examples.lengths.tolist())) > 1, "the batch really is padded"

    with torch.no_grad():
        assert takes_logits_to_keep(model), "the output layer runs at response positions only"
        batched = model_row_losses(model, batch)
        full_logits = per_row_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        singles = torch.cat([model_row_losses(model, examples.batch([i], pad_token_id(tokenizer))) for i in range(8)])
    hand = torch.tensor([hand_row_loss(model, examples.input_ids[i], int(examples.prompt_lengths[i])) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(batched.double(), hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, full_logits, rtol=1e-5, atol=1e-5)

    class WithoutLogitsToKeep(torch.nn.Module):  # a causal LM that always returns every position
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    assert not takes_logits_to_keep(WithoutLogitsToKeep(model))
    with torch.no_grad():
        torch.testing.assert_close(model_row_losses(WithoutLogitsToKeep(model), batch), batched, rtol=1e-5, atol=1e-5)


def test_per_row_loss_is_nan_for_a_row_without_response_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 5], [IGNORE_INDEX] * 4])
    losses = per_row_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:4])
    torch.testing.assert_close(losses[0], expected)
    assert torch.isnan(losses[1])


def test_truncation_and_rows_without_response_are_counted_by_reason(rows, tokenizer):
    long_question = rows[0]["question"]
    prompts = [long_question + "\n", "Short?\n", "Q?\n"]
    responses = ["An answer that is long enough to be cut.", "", "Yes."]
    prompt_tokens = len(tokenizer(long_question + "\n", add_special_tokens=False)["input_ids"]) + 1
    examples = encode_prompt_response(prompts, responses, tokenizer, max_length=prompt_tokens)
    assert examples.truncated.tolist() == [True, False, False]
    assert examples.no_response == Counter({NO_RESPONSE_TRUNCATED: 1, NO_RESPONSE_EMPTY: 1})
    assert examples.no_response_reason == [NO_RESPONSE_TRUNCATED, NO_RESPONSE_EMPTY, None]
    assert examples.response_tokens[0] == 0 and examples.response_tokens[1] == 0 and examples.response_tokens[2] > 0
    assert examples.with_response().tolist() == [2]
    assert all(len(ids) <= prompt_tokens for ids in examples.input_ids)
    batch = examples.batch([0, 1, 2], pad_token_id(tokenizer))
    assert (batch["labels"][:2] == IGNORE_INDEX).all(), "rows without response tokens get no loss"
    losses = per_row_loss(torch.randn(*batch["input_ids"].shape, len(tokenizer)), batch["labels"])
    assert torch.isnan(losses[:2]).all() and torch.isfinite(losses[2])
    figures = examples.figures()
    assert figures["rows_truncated"] == 1 and sum(figures["rows_without_response_tokens"].values()) == 2

    # Cut inside the response: still learnable, counted as truncated.
    cut = encode_prompt_response(prompts[:1], responses[:1], tokenizer, max_length=prompt_tokens + 3)
    assert cut.truncated.tolist() == [True] and cut.response_tokens.tolist() == [3] and not cut.no_response


def test_chat_rows_without_and_with_a_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    assert split_messages(messages) == ("system: Be brief.\nuser: What is 2+3?\nassistant: ", "5")

    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    templated.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt, response = split_messages(messages, templated)
    assert prompt == "<system>Be brief.</system><user>What is 2+3?</user><assistant>"
    assert response == "5</assistant>"

    data = loaded_rows([{"messages": messages}, {"messages": messages[:2] + [{"role": "assistant", "content": "five"}, {"role": "user", "content": "thanks"}]}])
    fmt = resolve_example_format(data.dataset.column_names, None, None, data.source)
    assert fmt.messages_field == "messages"
    examples, _ = build_lm_examples(data, fmt, tokenizer, max_length=64)
    second = examples.input_ids[1]
    assert tokenizer.decode(second[examples.prompt_lengths[1]:-1]) == "five", "the last assistant message is the response"


def test_malformed_rows_name_the_row_or_are_skipped_and_counted(tokenizer):
    data = loaded_rows([
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
    ], source="chat.jsonl")
    fmt = ExampleFormat(messages_field="messages")
    with pytest.raises(DataError, match=r"chat.jsonl line 2: 'messages' has no assistant message"):
        build_lm_examples(data, fmt, tokenizer, max_length=64)
    examples, kept = build_lm_examples(data, fmt, tokenizer, max_length=64, skip_bad_rows=True)
    assert len(examples) == 1 and kept.skipped == Counter({"no assistant message": 1})
    assert kept.source_index.tolist() == [0]


def test_example_format_defaults_and_missing_columns():
    assert resolve_example_format(["prompt", "completion"], None, None, "d") == ExampleFormat("{prompt}", "completion")
    assert resolve_example_format(["question", "answer"], "{question}", "answer", "d") == ExampleFormat("{question}", "answer")
    assert resolve_example_format(["text"], None, "text", "d") == ExampleFormat(None, "text")
    with pytest.raises(DataError, match="d: no column 'answr'.*columns are: question, answer"):
        resolve_example_format(["question", "answer"], "{question}", "answr", "d")
    with pytest.raises(DataError, match="--template names column\\(s\\) quest"):
        resolve_example_format(["question", "answer"], "{quest}", "answer", "d")
    with pytest.raises(UsageError, match="columns are: question, answer"):
        resolve_example_format(["question", "answer"], None, None, "d")
    fmt = ExampleFormat("{q}", "a", separator=" ")
    assert ExampleFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt


def test_collate_pads_right_and_masks():
    batch = collate_lm_batch([[5, 6, 7, 8], [9, 10]], [2, 1], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_trained_tokenizer_round_trips_through_save_and_autotokenizer(tmp_path, rows, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = rows[3]["answer"] + " — naïve 日本語 ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text, "byte-level: any text survives encoding"
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({again.bos_token_id, again.eos_token_id, again.pad_token_id}) == 3
    assert len(again) == len(tokenizer) <= 400
    with pytest.raises(UsageError, match="--vocab-size 100"):
        from dyn.core.tokenizer_training import train_bpe_tokenizer

        train_bpe_tokenizer(["a"], vocab_size=100)


def test_presets_config_files_and_folders(tmp_path, tokenizer, model):
    from dyn.core.models import context_length, fresh_config, load_model_and_tokenizer, resolve_model_source

    tiny = fresh_config(resolve_model_source("tiny"), tokenizer)
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, context_length(tiny)) == (2, 64, 2, 512)
    assert tiny.vocab_size == len(tokenizer) and tiny.eos_token_id == tokenizer.eos_token_id
    small = fresh_config(resolve_model_source("small"), tokenizer)
    assert (small.n_layer, small.n_embd, small.n_head, context_length(small)) == (4, 256, 4, 1024)

    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"n_layer": 2, "n_layers": 3}))
    with pytest.raises(UsageError, match="unknown config key\\(s\\) n_layers"):
        fresh_config(resolve_model_source(str(bad_key)), tokenizer)
    bad_shape = tmp_path / "shape.json"
    bad_shape.write_text(json.dumps({"n_embd": 30, "n_head": 4}))
    with pytest.raises(UsageError, match="not divisible"):
        fresh_config(resolve_model_source(str(bad_shape)), tokenizer)
    with pytest.raises(UsageError, match="no such preset, config file or model folder"):
        resolve_model_source("huge")

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    with pytest.raises(UsageError, match="no tokenizer in the folder"):
        load_model_and_tokenizer(str(folder))
    tokenizer.save_pretrained(folder)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(folder), attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager" and len(loaded_tokenizer) == len(tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
