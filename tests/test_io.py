"""Dataset I/O, text extraction and precomputed vectors (core/io.py, core/text.py, core/vectors.py,
core/atomic.py), on small slices of the real instruction mix read at test time."""

from __future__ import annotations

import decimal
import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dyn.core.atomic import atomic_output, write_text_atomic
from dyn.core.errors import DataError, UsageError
from dyn.core.io import check_output_path, read_rows, row_format, write_rows
from dyn.core.text import (
    DEFAULT_PROMPT_COMPLETION,
    TextSpec,
    extract_texts,
    render_messages,
    resolve_text_spec,
)
from dyn.core.vectors import vectors_from_column

T0_MIX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "t0-mix.jsonl.gz"


def first_t0_rows(n: int) -> list[dict]:
    """The first n rows of the real instruction mix (prompt, completion, task)."""
    if not T0_MIX.exists():
        pytest.skip(f"real data not found at {T0_MIX}")
    with gzip.open(T0_MIX, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dataset_of(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def leftovers(folder: Path) -> list[str]:
    """Temporary or half-replaced entries that an atomic write must never leave behind."""
    return [p.name for p in folder.iterdir() if ".dyn-tmp-" in p.name or ".dyn-old-" in p.name]


def chat_rows(n: int) -> list[dict]:
    """Chat rows built from real prompts/completions: a `messages` list of {role, content}."""
    return [
        {
            "id": i,
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ],
        }
        for i, row in enumerate(first_t0_rows(n))
    ]


# --------------------------------------------------------------------------- round trips

ROUND_TRIP_NAMES = [
    ("rows.jsonl", "jsonl"),
    ("rows.jsonl.gz", "jsonl"),
    ("rows.json", "jsonl"),  # written as JSON lines, which is what .json reads back as
    ("rows.parquet", "parquet"),
    ("rows.csv", "csv"),
    ("rows.csv.gz", "csv"),
    ("rows.arrow", "arrow"),
    ("rows.arrow.gz", "arrow"),
    ("rows_saved", "save_to_disk"),  # no suffix: a save_to_disk folder
]


@pytest.mark.parametrize("name,fmt", ROUND_TRIP_NAMES)
def test_round_trip_every_format(tmp_path, name, fmt):
    rows = first_t0_rows(50)
    out = tmp_path / name
    write_rows(dataset_of(rows), str(out))

    loaded = read_rows(str(out))
    assert loaded.format == fmt
    assert loaded.dataset.column_names == ["prompt", "completion", "task"]
    assert loaded.dataset.to_list() == rows
    assert loaded.rows_in_source == 50
    np.testing.assert_array_equal(loaded.source_index, np.arange(50))
    assert not loaded.skipped
    if name.endswith(".gz"):
        assert out.read_bytes()[:2] == b"\x1f\x8b", "a .gz output must really be gzip"
    if fmt == "save_to_disk":
        assert out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.parquet", "t.arrow", "t_saved"])
def test_round_trip_keeps_types(tmp_path, name):
    """Ints, floats, bools, nulls and lists survive every format that can hold them."""
    rows = [
        {"i": 1, "x": 0.5, "flag": True, "maybe": "a", "vec": [0.25, -1.0, 3.0]},
        {"i": -7, "x": 1e-3, "flag": False, "maybe": None, "vec": [1.0, 2.0, 4.5]},
    ]
    out = tmp_path / name
    write_rows(dataset_of(rows), str(out))
    assert read_rows(str(out)).dataset.to_list() == rows


def test_round_trip_of_a_selected_view_writes_the_chosen_rows_in_order(tmp_path):
    rows = first_t0_rows(20)
    view = dataset_of(rows).select([7, 2, 15])
    write_rows(view, str(tmp_path / "v.parquet"))
    assert read_rows(str(tmp_path / "v.parquet")).dataset.to_list() == [rows[7], rows[2], rows[15]]


@pytest.mark.parametrize("name", ["big.csv", "big.csv.gz"])
def test_csv_with_multiline_values_larger_than_one_read_block(tmp_path, name):
    """Prompts hold newlines and quotes; a CSV over pyarrow's 1 MB block must still read back."""
    base = first_t0_rows(50)
    rows = [dict(row, copy=i) for i in range(30) for row in base]  # about 1.4 MB of CSV
    assert any("\n" in row["prompt"] for row in rows)
    out = tmp_path / name
    write_rows(dataset_of(rows), str(out))
    loaded = read_rows(str(out))
    assert len(loaded.dataset) == len(rows)
    assert loaded.dataset.to_list() == rows


def test_json_array_input(tmp_path):
    rows = first_t0_rows(12)
    path = tmp_path / "array.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    loaded = read_rows(str(path))
    assert loaded.format == "json"
    assert loaded.dataset.to_list() == rows
    assert loaded.rows_in_source == 12
    assert loaded.where(5) == f"{path} row 5"


def test_json_array_with_a_non_object_names_the_row(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, ["not", "a", "row"]]), encoding="utf-8")
    with pytest.raises(DataError, match=r"array\.json row 2: expected a JSON object, got list"):
        read_rows(str(path))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"array\.json line 3: malformed JSON"):
        read_rows(str(path))


# --------------------------------------------------------------------------- chat columns

@pytest.mark.parametrize("name", ["chat.jsonl", "chat.parquet", "chat.arrow"])
def test_nested_messages_column_round_trips(tmp_path, name):
    rows = chat_rows(10)
    write_rows(dataset_of(rows), str(tmp_path / name))
    loaded = read_rows(str(tmp_path / name))
    assert loaded.dataset.to_list() == rows
    texts, _ = extract_texts(loaded, resolve_text_spec(loaded.dataset.column_names, None, None, name))
    assert texts[0] == f"user: {rows[0]['messages'][0]['content']}\nassistant: {rows[0]['messages'][1]['content']}"


@pytest.mark.parametrize("name", ["chat.csv", "chat.csv.gz"])
def test_csv_refuses_nested_columns_and_writes_nothing(tmp_path, name):
    with pytest.raises(UsageError) as err:
        write_rows(dataset_of(chat_rows(5)), str(tmp_path / name))
    message = str(err.value)
    assert name in message and "messages" in message and ".jsonl" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad rows

def _lines_with_bad_ones(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = first_t0_rows(10)
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-5]  # truncated object: malformed JSON on line 3
    lines[6] = "[1, 2, 3]"  # valid JSON but not an object, line 7
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, rows


def test_malformed_line_is_named_by_its_number(tmp_path):
    path, _ = _lines_with_bad_ones(tmp_path)
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} line 3: malformed JSON")
    assert "--skip-bad-rows" in message


def test_skip_bad_rows_keeps_original_positions_and_counts(tmp_path):
    path, rows = _lines_with_bad_ones(tmp_path)
    loaded = read_rows(str(path), skip_bad_rows=True)
    kept = [0, 1, 3, 4, 5, 7, 8, 9]
    assert loaded.dataset.to_list() == [rows[i] for i in kept]
    np.testing.assert_array_equal(loaded.source_index, kept)
    np.testing.assert_array_equal(loaded.line_numbers, [i + 1 for i in kept])
    assert dict(loaded.skipped) == {"malformed JSON line": 2}
    assert loaded.rows_in_source == 10
    # where() names the file line of a kept row, not its position among the kept rows.
    assert loaded.where(2) == f"{path} line 4"
    assert loaded.where(5) == f"{path} line 8"


def test_skip_bad_rows_in_a_gzip_file(tmp_path):
    path, rows = _lines_with_bad_ones(tmp_path)
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    loaded = read_rows(str(gz), skip_bad_rows=True)
    np.testing.assert_array_equal(loaded.source_index, [0, 1, 3, 4, 5, 7, 8, 9])
    assert loaded.skipped["malformed JSON line"] == 2


def test_all_lines_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("{oops\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError, match="no valid rows"):
        read_rows(str(path), skip_bad_rows=True)


def test_where_names_line_for_json_lines_and_row_for_tables(tmp_path):
    rows = first_t0_rows(5)
    jsonl(tmp_path / "a.jsonl", rows)
    write_rows(dataset_of(rows), str(tmp_path / "a.parquet"))
    assert read_rows(str(tmp_path / "a.jsonl")).where(3) == f"{tmp_path / 'a.jsonl'} line 4"
    assert read_rows(str(tmp_path / "a.parquet")).where(3) == f"{tmp_path / 'a.parquet'} row 3"


def test_column_that_mixes_types_is_named_with_both_lines(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"text": None}, {"text": 5}])
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    assert str(err.value) == f"{path}: column 'text' mixes types: str at line 1, number at line 3"


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_rows(str(path))


def test_empty_parquet_is_a_data_error(tmp_path):
    write_rows(dataset_of(first_t0_rows(3)).select([]), str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"none\.parquet: no rows"):
        read_rows(str(tmp_path / "none.parquet"))


def test_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: cannot read as UTF-8"):
        read_rows(str(path))


def test_truncated_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(("".join(json.dumps(r) + "\n" for r in first_t0_rows(20))).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot read"):
        read_rows(str(path))


def test_unknown_suffix_and_missing_file_are_usage_errors(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(UsageError, match=r"rows\.txt: unknown file type"):
        read_rows(str(tmp_path / "rows.txt"))
    with pytest.raises(UsageError, match=r"nothere\.jsonl: no such file"):
        read_rows(str(tmp_path / "nothere.jsonl"))


def test_row_format_from_suffix():
    assert row_format("a/b.JSONL.GZ") == ("jsonl", True)
    assert row_format("b.parquet") == ("parquet", False)
    assert row_format("folder") == (None, False)


# --------------------------------------------------------------------------- atomic writes

def test_successful_write_leaves_no_temporary_file(tmp_path):
    for name in ["a.jsonl", "a.parquet", "a.csv.gz", "a.arrow", "a_saved"]:
        write_rows(dataset_of(first_t0_rows(5)), str(tmp_path / name))
    write_text_atomic(tmp_path / "note.json", "{}\n")
    assert leftovers(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.csv"
    write_rows(dataset_of(first_t0_rows(4)), str(out))
    before = out.read_bytes()
    with pytest.raises(UsageError):
        write_rows(dataset_of(chat_rows(3)), str(out))  # CSV cannot hold `messages`
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    """JSON lines are streamed into the temporary file; a value that cannot be written stops it."""
    out = tmp_path / "out.jsonl"
    write_rows(dataset_of(first_t0_rows(4)), str(out))
    before = out.read_bytes()
    import datasets
    import pyarrow as pa

    bad = datasets.Dataset(pa.table({"text": ["a", "b"], "price": pa.array([decimal.Decimal("1.5")] * 2)}))
    with pytest.raises(TypeError):
        write_rows(bad, str(out))
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_atomic_output_removes_the_partial_file_on_any_error(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            Path(tmp).write_text("half")
            assert Path(tmp).parent == tmp_path  # same folder, so the rename is atomic
            raise KeyboardInterrupt
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_folder_output_is_replaced_whole(tmp_path):
    out = tmp_path / "saved"
    rows = first_t0_rows(8)
    write_rows(dataset_of(rows[:3]), str(out))
    write_rows(dataset_of(rows[3:]), str(out))
    assert read_rows(str(out)).dataset.to_list() == rows[3:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


# --------------------------------------------------------------------------- output paths

def test_check_output_path_accepts_a_new_file(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    check_output_path(str(tmp_path / "out.parquet"), [str(src)])
    check_output_path(str(tmp_path / "out_folder"), [str(src)])


def test_check_output_path_refuses_the_input_itself(tmp_path, monkeypatch):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_output_path(str(src), [str(src)])
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_output_path("./in.jsonl", [str(src)])  # same file, other spelling
    os.symlink(src, tmp_path / "link.jsonl")
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_output_path("link.jsonl", [str(src)])


def test_check_output_path_refuses_a_path_inside_an_input_folder(tmp_path):
    write_rows(dataset_of(first_t0_rows(3)), str(tmp_path / "saved"))
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_output_path(str(tmp_path / "saved" / "out.jsonl"), [str(tmp_path / "saved")])


def test_check_output_path_refuses_a_folder_output_that_holds_the_input(tmp_path):
    """A folder output replaces the whole folder: an input inside it would be deleted."""
    (tmp_path / "prev").mkdir()
    src = jsonl(tmp_path / "prev" / "data.jsonl", [{"text": "a"}])
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_output_path(str(tmp_path / "prev"), [str(src)])


def test_check_output_path_refuses_a_run_record_over_the_input(tmp_path):
    """`-o a.jsonl` writes `a.jsonl.dyn.json` too; that must not be the input."""
    src = jsonl(tmp_path / "a.jsonl.dyn.json", [{"text": "a"}])
    with pytest.raises(UsageError, match="run record"):
        check_output_path(str(tmp_path / "a.jsonl"), [str(src)])


def test_check_output_path_refuses_a_missing_folder(tmp_path):
    with pytest.raises(UsageError) as err:
        check_output_path(str(tmp_path / "nope" / "out.jsonl"), [])
    assert str(err.value) == f"{tmp_path / 'nope' / 'out.jsonl'}: folder {tmp_path / 'nope'} does not exist"


def test_check_output_path_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(UsageError, match=r"unknown output type '\.txt'"):
        check_output_path(str(tmp_path / "out.txt"), [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any folder")
def test_check_output_path_refuses_an_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="is not writable"):
            check_output_path(str(locked / "out.jsonl"), [])
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- text extraction

def _loaded(tmp_path: Path, rows: list[dict], name: str = "rows.jsonl"):
    return read_rows(str(jsonl(tmp_path / name, rows)))


def test_text_field_takes_one_column(tmp_path):
    rows = first_t0_rows(6)
    loaded = _loaded(tmp_path, rows)
    spec = resolve_text_spec(loaded.dataset.column_names, "completion", None, loaded.source)
    assert spec == TextSpec(field="completion")
    texts, same = extract_texts(loaded, spec)
    assert texts == [r["completion"] for r in rows]
    assert same is loaded


def test_template_formats_columns(tmp_path):
    rows = first_t0_rows(6)
    loaded = _loaded(tmp_path, rows)
    spec = resolve_text_spec(loaded.dataset.column_names, None, "[{task}] {prompt}", loaded.source)
    texts, _ = extract_texts(loaded, spec)
    assert texts == [f"[{r['task']}] {r['prompt']}" for r in rows]


def test_template_naming_a_missing_column_lists_the_columns(tmp_path):
    loaded = _loaded(tmp_path, first_t0_rows(3))
    with pytest.raises(DataError) as err:
        resolve_text_spec(loaded.dataset.column_names, None, "{prompt} {answer}", loaded.source)
    message = str(err.value)
    assert message.startswith(f"{loaded.source}: --template names column(s) answer")
    assert message.endswith("columns are: prompt, completion, task")


@pytest.mark.parametrize("template", ["{}", "{0}", "no placeholder", "{prompt"])
def test_template_that_names_no_column_is_a_usage_error(template):
    with pytest.raises(UsageError, match="--template"):
        resolve_text_spec(["prompt"], None, template, "x.jsonl")


def test_text_field_naming_a_missing_column_lists_the_columns():
    with pytest.raises(DataError) as err:
        resolve_text_spec(["question", "answer"], "text", None, "gsm.jsonl")
    assert str(err.value) == "gsm.jsonl: no column 'text'; columns are: question, answer"


def test_text_field_and_template_together_is_a_usage_error():
    with pytest.raises(UsageError, match="alternatives"):
        resolve_text_spec(["prompt"], "prompt", "{prompt}", "x.jsonl")


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["text", "messages", "prompt", "completion"], TextSpec(field="text")),
        (["id", "messages", "prompt", "completion"], TextSpec(messages_field="messages")),
        (["prompt", "completion", "task"], TextSpec(template=DEFAULT_PROMPT_COMPLETION)),
    ],
)
def test_default_text_choice(columns, expected):
    assert resolve_text_spec(columns, None, None, "x.jsonl") == expected


def test_no_default_text_asks_for_a_flag_and_lists_columns():
    with pytest.raises(UsageError) as err:
        resolve_text_spec(["question", "answer"], None, None, "gsm.jsonl")
    message = str(err.value)
    assert message.startswith("gsm.jsonl: cannot tell which text to use")
    assert "--text-field" in message and "question, answer" in message


def test_default_prompt_completion_text(tmp_path):
    rows = first_t0_rows(5)
    loaded = _loaded(tmp_path, rows)
    texts, _ = extract_texts(loaded, resolve_text_spec(loaded.dataset.column_names, None, None, loaded.source))
    assert texts == [f"{r['prompt']}\n{r['completion']}" for r in rows]


def test_text_field_messages_means_chat_rendering():
    assert resolve_text_spec(["messages"], "messages", None, "x") == TextSpec(messages_field="messages")


def _tiny_tokenizer(chat_template: str | None):
    """A real fast tokenizer built in-process (no download), with or without a chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_messages_render_as_role_lines_without_a_chat_template():
    messages = chat_rows(1)[0]["messages"]
    expected = f"user: {messages[0]['content']}\nassistant: {messages[1]['content']}"
    assert render_messages(messages, None) == expected
    assert render_messages(messages, _tiny_tokenizer(None)) == expected


def test_chat_messages_use_the_tokenizers_chat_template():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tokenizer = _tiny_tokenizer("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    assert render_messages(messages, tokenizer) == "<|user|>hi\n<|assistant|>hello\n"


def test_malformed_messages_name_the_row(tmp_path):
    rows = chat_rows(4)
    rows[2]["messages"] = [{"role": "user", "content": None}]
    loaded = _loaded(tmp_path, rows, "chat.jsonl")
    spec = TextSpec(messages_field="messages")
    with pytest.raises(DataError, match=r"chat\.jsonl line 3: a message lacks a string 'role' or 'content'"):
        extract_texts(loaded, spec)
    texts, kept = extract_texts(loaded, spec, skip_bad_rows=True)
    assert len(texts) == 3
    np.testing.assert_array_equal(kept.source_index, [0, 1, 3])
    assert dict(kept.skipped) == {"malformed messages": 1}


@pytest.mark.parametrize("bad_value,kind", [(None, "null"), (7, "int")])
def test_non_string_text_names_the_row(tmp_path, bad_value, kind):
    rows = [{"text": r["prompt"]} for r in first_t0_rows(5)]
    if bad_value is None:
        rows[3]["text"] = None
    else:  # a column of numbers throughout (a mix of types is refused when reading)
        rows = [{"text": bad_value + i} for i in range(5)]
    loaded = _loaded(tmp_path, rows)
    line = 4 if bad_value is None else 1
    with pytest.raises(DataError) as err:
        extract_texts(loaded, TextSpec(field="text"))
    assert str(err.value).startswith(f"{loaded.source} line {line}: column 'text' is {kind}, not text")


def test_skipping_non_string_text_keeps_source_positions(tmp_path):
    rows = [{"text": r["prompt"]} for r in first_t0_rows(6)]
    rows[1]["text"] = None
    rows[4]["text"] = None
    loaded = _loaded(tmp_path, rows)
    texts, kept = extract_texts(loaded, TextSpec(field="text"), skip_bad_rows=True)
    assert texts == [rows[i]["text"] for i in (0, 2, 3, 5)]
    np.testing.assert_array_equal(kept.source_index, [0, 2, 3, 5])
    assert dict(kept.skipped) == {"non-string text in 'text'": 2}
    assert kept.where(2) == f"{loaded.source} line 4"


def test_template_with_a_null_value_names_the_row(tmp_path):
    rows = first_t0_rows(4)
    rows[1]["completion"] = None
    loaded = _loaded(tmp_path, rows)
    with pytest.raises(DataError, match=r"rows\.jsonl line 2: column 'completion' is null"):
        extract_texts(loaded, TextSpec(template=DEFAULT_PROMPT_COMPLETION))


# --------------------------------------------------------------------------- vectors

def _vector_rows(tmp_path: Path, vectors: list, name: str = "vec.jsonl"):
    base = first_t0_rows(len(vectors))
    return _loaded(tmp_path, [{"task": b["task"], "vec": v} for b, v in zip(base, vectors)], name)


def test_vectors_from_column_gives_a_float32_matrix(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(6, 5)).round(6).tolist()
    loaded = _vector_rows(tmp_path, vectors)
    matrix, kept = vectors_from_column(loaded, "vec", require_nonzero=True)
    assert matrix.dtype == np.float32 and matrix.shape == (6, 5) and matrix.flags.c_contiguous
    np.testing.assert_allclose(matrix, np.asarray(vectors, dtype=np.float32))
    assert kept is loaded


@pytest.mark.parametrize(
    "bad,problem",
    [
        ([float("nan"), 1.0, 2.0], "contains NaN or infinity"),
        ([float("inf"), 1.0, 2.0], "contains NaN or infinity"),
        ([1.0, float("-inf"), 2.0], "contains NaN or infinity"),
        ([0.0, 0.0, 0.0], "is all zeros (no direction for the cosine metric)"),
        ([1.0, 2.0], "has 2 numbers where earlier rows have 3"),
        ([1.0, 2.0, 3.0, 4.0], "has 4 numbers where earlier rows have 3"),
        ([], "is not a flat list of numbers"),
        (None, "is not a list of numbers"),
        ([1.0, None, 2.0], "is not a list of numbers"),
    ],
)
def test_bad_vector_names_the_line_and_column(tmp_path, bad, problem):
    vectors = [[1.0, 0.5, 0.25], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [1.0, 1.0, 1.0]]
    vectors[2] = bad
    loaded = _vector_rows(tmp_path, vectors)
    with pytest.raises(DataError) as err:
        vectors_from_column(loaded, "vec", require_nonzero=True)
    message = str(err.value)
    assert message.startswith(f"{loaded.source} line 3: vector in 'vec' {problem}")
    assert "--skip-bad-rows" in message and "\n" not in message


def test_nested_lists_are_not_vectors(tmp_path):
    loaded = _vector_rows(tmp_path, [[[1.0, 2.0]], [[3.0, 4.0]]])
    with pytest.raises(DataError, match=r"vec\.jsonl line 1: vector in 'vec' is not a flat list of numbers"):
        vectors_from_column(loaded, "vec", require_nonzero=True)


def test_all_zero_vector_is_fine_for_l2(tmp_path):
    loaded = _vector_rows(tmp_path, [[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    matrix, _ = vectors_from_column(loaded, "vec", require_nonzero=False)
    assert matrix.shape == (3, 2)
    with pytest.raises(DataError, match="line 2: vector in 'vec' is all zeros"):
        vectors_from_column(loaded, "vec", require_nonzero=True)


@pytest.mark.parametrize(
    "values",
    [["a", "b", "c"], ["1.5", "x", "2"], [1, 2, 3], [True, False, True], [["0.5", "1.5"], ["1", "2"], ["2", "3"]]],
)
def test_non_list_vector_values_are_refused(tmp_path, values):
    loaded = _vector_rows(tmp_path, values)
    with pytest.raises(DataError, match=r"vec\.jsonl line 1: vector in 'vec' is not a"):
        vectors_from_column(loaded, "vec", require_nonzero=False)


def test_bad_vectors_skipped_keep_positions_and_counts(tmp_path):
    vectors = [[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 2.0, 3.0], [0.5, 0.5]]
    loaded = _vector_rows(tmp_path, vectors)
    matrix, kept = vectors_from_column(loaded, "vec", require_nonzero=True, skip_bad_rows=True)
    np.testing.assert_allclose(matrix, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_array_equal(kept.source_index, [0, 2, 5])
    assert dict(kept.skipped) == {"bad vector in 'vec'": 3}
    assert kept.dataset["task"] == [loaded.dataset["task"][i] for i in (0, 2, 5)]


def test_first_row_bad_and_skipped_takes_the_dimension_from_the_next(tmp_path):
    loaded = _vector_rows(tmp_path, [[0.0, 0.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
    matrix, kept = vectors_from_column(loaded, "vec", require_nonzero=True, skip_bad_rows=True)
    assert matrix.shape == (2, 2)
    np.testing.assert_array_equal(kept.source_index, [1, 2])


def test_no_usable_vector_is_an_error(tmp_path):
    loaded = _vector_rows(tmp_path, [[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(DataError, match="no usable vector in 'vec'"):
        vectors_from_column(loaded, "vec", require_nonzero=True, skip_bad_rows=True)


def test_missing_vector_column_lists_the_columns(tmp_path):
    loaded = _vector_rows(tmp_path, [[1.0, 2.0]])
    with pytest.raises(DataError) as err:
        vectors_from_column(loaded, "emb", require_nonzero=True)
    assert str(err.value) == f"{loaded.source}: no column 'emb'; columns are: task, vec"


def test_vectors_from_parquet_report_rows_not_lines(tmp_path):
    rows = [{"vec": [1.0, 2.0]}, {"vec": [float("nan"), 0.0]}]
    write_rows(dataset_of(rows), str(tmp_path / "v.parquet"))
    loaded = read_rows(str(tmp_path / "v.parquet"))
    with pytest.raises(DataError, match=r"v\.parquet row 1: vector in 'vec' contains NaN"):
        vectors_from_column(loaded, "vec", require_nonzero=True)


def test_json_lines_with_unicode_line_separators_inside_strings(tmp_path):
    """Raw U+0085 / U+2028 / \\x1c inside JSON strings are not line breaks (the real mix has them)."""
    import json as _json

    from dyn.core.io import read_rows

    rows = [{"text": "a\x85b"}, {"text": "c\u2028d\x1ce"}, {"text": "plain"}]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(_json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    loaded = read_rows(str(path))
    assert loaded.dataset["text"] == [r["text"] for r in rows]
    assert loaded.line_numbers.tolist() == [1, 2, 3]


def test_template_typed_in_a_shell_reads_backslash_n_as_a_newline():
    from dyn.core.text import resolve_text_spec

    spec = resolve_text_spec(["prompt", "completion"], None, r"{prompt}\n{completion}", "x.jsonl")
    assert spec.template == "{prompt}\n{completion}"
