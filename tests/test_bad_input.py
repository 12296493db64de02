"""Bad input through the command line: every failure exits with dyn's code (2 usage, 3 data),
prints ONE line on stderr that names the file (and line/row/column where there is one), and
writes neither an output nor a run record. Small slices of the real data, read at test time."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dyn.cli.app import app

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T0_MIX = SHARED_DATA / "t0-mix.jsonl.gz"
GSM8K = SHARED_DATA / "gsm8k-test.jsonl"

SUMMARY_KEYS = {"rows_in", "rows_out", "figures", "output", "run_record"}


def first_rows(path: Path, n: int) -> list[dict]:
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path, monkeypatch):
    """Never download; the embedding cache lives under this test's tmp_path, not the user's."""
    monkeypatch.setenv("DYN_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("DYN_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def work(tmp_path) -> Path:
    """The folder that holds a test's inputs and outputs (the cache is elsewhere)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def vector_lines(n: int = 12, dim: int = 4) -> list[str]:
    """Real rows of the instruction mix with a precomputed `vec` column, one JSON line each."""
    rng = np.random.default_rng(0)
    rows = first_rows(T0_MIX, n)
    return [json.dumps(dict(row, vec=rng.normal(size=dim).round(5).tolist())) for row in rows]


def vector_file(work: Path, name: str = "data.jsonl", n: int = 12, replace: dict | None = None) -> Path:
    """A JSON lines file of real rows with a `vec` column; `replace` maps a 1-based line to new text."""
    lines = vector_lines(n)
    for line, text in (replace or {}).items():
        lines[line - 1] = text
    return write_lines(work / name, lines)


def select(*args: str):
    return CliRunner().invoke(app, ["select", "--method", "hmin", *map(str, args)])


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_fails(result, code: int, *fragments: str, work: Path, before: set[str]) -> str:
    """Exit code, one `dyn: error:` line naming what is wrong, nothing on stdout, nothing written."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("dyn: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert files_in(work) == before, "a failed run must write no output, run record or temporary file"
    return line


# --------------------------------------------------------------------------- data errors (exit 3)

@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(work, content):
    data = work / "empty.jsonl"
    data.write_text(content)
    before = files_in(work)
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data}: file is empty", work=work, before=before)


def test_malformed_json_names_the_line(work):
    data = vector_file(work, replace={5: '{"prompt": "cut off", "vec": [1, 2'})
    before = files_in(work)
    result = select(data, "-k", "3", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data} line 5: malformed JSON", "--skip-bad-rows", work=work, before=before)


def test_skip_bad_rows_succeeds_and_records_the_count(work):
    data = vector_file(work, n=12, replace={5: '{"prompt": "cut off", "vec": [1, 2', 9: "[1, 2, 3]"})
    out = work / "out.jsonl"
    result = select(data, "-k", "10", "--embedding-field", "vec", "-o", out, "--skip-bad-rows", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_in"] == 12 and summary["rows_out"] == 10
    assert summary["skipped_rows"] == {"malformed JSON line": 2}

    record = json.loads((work / "out.jsonl.dyn.json").read_text())
    assert record["skipped_rows"] == {"malformed JSON line": 2}
    assert record["inputs"][0]["rows"] == 12
    # dyn_index points at each row's place in the input; the two bad lines (0-based 4 and 8) are absent.
    picked = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["dyn_index"] for row in picked) == [0, 1, 2, 3, 5, 6, 7, 9, 10, 11]
    source = [json.loads(line) for line in vector_lines(12)]
    for row in picked:
        assert row["prompt"] == source[row["dyn_index"]]["prompt"]


def test_missing_text_column_lists_the_columns(work):
    data = vector_file(work)
    before = files_in(work)
    result = select(data, "-k", "2", "--text-field", "question", "-o", work / "out.jsonl")
    assert_fails(
        result, 3, f"{data}: no column 'question'", "columns are: prompt, completion, task, vec",
        work=work, before=before,
    )


def test_no_default_text_column_lists_the_columns(work):
    """GSM8K has question/answer: no text, messages or prompt+completion, so dyn asks for a flag."""
    data = work / "gsm.jsonl"
    write_lines(data, [json.dumps(row) for row in first_rows(GSM8K, 6)])
    before = files_in(work)
    result = select(data, "-k", "2", "-o", work / "out.jsonl")
    assert_fails(result, 2, f"{data}: cannot tell which text to use", "--text-field", "question, answer",
                 work=work, before=before)


def test_template_naming_an_absent_column(work):
    data = vector_file(work)
    before = files_in(work)
    result = select(data, "-k", "2", "--template", "{prompt}\n{answer}", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data}: --template names column(s) answer",
                 "columns are: prompt, completion, task, vec", work=work, before=before)


def test_null_text_names_the_line(work):
    """Goes through the default text path: the bundled MiniLM is loaded, then the row is refused."""
    rows = [{"text": row["prompt"]} for row in first_rows(T0_MIX, 6)]
    rows[3]["text"] = None
    data = write_lines(work / "texts.jsonl", [json.dumps(r) for r in rows])
    before = files_in(work)
    result = select(data, "-k", "2", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data} line 4: column 'text' is null, not text", work=work, before=before)


def test_numbers_in_the_text_field_name_the_line(work):
    data = write_lines(work / "numbers.jsonl", [json.dumps({"text": i, "id": i}) for i in range(5)])
    before = files_in(work)
    result = select(data, "-k", "2", "--text-field", "text", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data} line 1: column 'text' is int, not text", work=work, before=before)


def test_a_number_among_strings_names_the_column_and_lines(work):
    rows = [{"text": row["prompt"]} for row in first_rows(T0_MIX, 5)]
    rows[2]["text"] = 42
    data = write_lines(work / "mixed.jsonl", [json.dumps(r) for r in rows])
    before = files_in(work)
    result = select(data, "-k", "2", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data}: column 'text' mixes types", "line 1", "line 3", work=work, before=before)


@pytest.mark.parametrize(
    "bad_line,problem",
    [
        ('{"prompt": "p", "vec": [NaN, 1.0, 2.0, 3.0]}', "contains NaN or infinity"),
        ('{"prompt": "p", "vec": [1.0, Infinity, 2.0, 3.0]}', "contains NaN or infinity"),
        ('{"prompt": "p", "vec": [1.0, 2.0, -Infinity, 3.0]}', "contains NaN or infinity"),
        ('{"prompt": "p", "vec": [0, 0, 0, 0]}', "is all zeros"),
        ('{"prompt": "p", "vec": [1.0, 2.0]}', "has 2 numbers where earlier rows have 4"),
    ],
)
def test_bad_vectors_name_the_line_and_column(work, bad_line, problem):
    data = vector_file(work, replace={7: bad_line})
    before = files_in(work)
    result = select(data, "-k", "3", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data} line 7: vector in 'vec' {problem}", work=work, before=before)


def test_all_zero_vector_is_accepted_for_l2(work):
    data = vector_file(work, replace={7: '{"prompt": "p", "vec": [0, 0, 0, 0]}'})
    result = select(data, "-k", "3", "--embedding-field", "vec", "--metric", "l2", "-o", work / "out.jsonl")
    assert result.exit_code == 0, result.stderr


def test_missing_vector_column(work):
    data = vector_file(work)
    before = files_in(work)
    result = select(data, "-k", "3", "--embedding-field", "emb", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data}: no column 'emb'", "vec", work=work, before=before)


def test_parquet_input_names_the_row(work):
    from dyn.core.io import read_rows, write_rows

    jsonl = vector_file(work, name="tmp.jsonl", replace={4: '{"prompt": "p", "vec": [NaN, 1.0, 2.0, 3.0]}'})
    data = work / "data.parquet"
    write_rows(read_rows(str(jsonl)).dataset, str(data))
    jsonl.unlink()
    before = files_in(work)
    result = select(data, "-k", "3", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 3, f"{data} row 3: vector in 'vec' contains NaN", work=work, before=before)


# --------------------------------------------------------------------------- usage errors (exit 2)

@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["-k", "0"], "-k 0: must be at least 1"),
        (["-k", "-3"], "-k -3: must be at least 1"),
        (["-k", "13"], "has only 12 usable rows"),
        (["--fraction", "0"], "--fraction 0.0: must be in (0, 1]"),
        (["--fraction", "1.5"], "--fraction 1.5: must be in (0, 1]"),
        (["-k", "2", "--fraction", "0.5"], "-k and --fraction are alternatives"),
        ([], "-k N or --fraction F"),
    ],
)
def test_budget_flags(work, flags, fragment):
    data = vector_file(work, n=12)
    before = files_in(work)
    result = select(data, *flags, "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 2, fragment, work=work, before=before)
    if "13" in flags:
        assert f"-k 13: {data} has only 12 usable rows" in result.stderr


def test_garbage_model_folder(work):
    data = vector_file(work)
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text("{this is not json")
    before = files_in(work)
    result = select(data, "-k", "2", "--embedding-model", model, "-o", work / "out.jsonl")
    assert_fails(result, 2, f"--embedding-model {model}: cannot load", work=work, before=before)


def test_model_folder_that_does_not_exist(work):
    data = vector_file(work)
    before = files_in(work)
    missing = work / "no-such-model"
    result = select(data, "-k", "2", "--embedding-model", missing, "-o", work / "out.jsonl")
    assert_fails(result, 2, f"--embedding-model {missing}: not a model folder", work=work, before=before)


def test_output_equal_to_the_input(work, monkeypatch):
    data = vector_file(work)
    content = data.read_bytes()
    before = files_in(work)
    monkeypatch.chdir(work)
    for output in (str(data), "data.jsonl", "./data.jsonl"):
        result = select("data.jsonl", "-k", "2", "--embedding-field", "vec", "-o", output)
        assert_fails(result, 2, "would overwrite the input", "data.jsonl", work=work, before=before)
    assert data.read_bytes() == content


def test_folder_output_holding_the_input(work):
    """`-o prev` replaces the folder prev/: an input inside it must be refused, not deleted."""
    (work / "prev").mkdir()
    data = vector_file(work / "prev")
    before = files_in(work)
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", work / "prev")
    assert_fails(result, 2, "would overwrite the input", str(data), work=work, before=before)
    assert data.exists()


def test_output_folder_that_does_not_exist(work):
    data = vector_file(work)
    before = files_in(work)
    out = work / "missing" / "out.jsonl"
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", out)
    assert_fails(result, 2, str(out), f"folder {work / 'missing'} does not exist", work=work, before=before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_output_folder_not_writable(work):
    data = vector_file(work)
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    before = files_in(work)
    try:
        result = select(data, "-k", "2", "--embedding-field", "vec", "-o", locked / "out.jsonl")
        assert_fails(result, 2, f"folder {locked} is not writable", work=work, before=before)
    finally:
        locked.chmod(0o755)


def test_unknown_output_suffix(work):
    data = vector_file(work)
    before = files_in(work)
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", work / "out.txt")
    assert_fails(result, 2, f"{work / 'out.txt'}: unknown output type '.txt'", work=work, before=before)


def test_csv_output_of_a_nested_column_writes_nothing(work):
    """The refusal comes at write time, after the selection: still no output and no run record."""
    rng = np.random.default_rng(1)
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
         "vec": rng.normal(size=4).tolist()}
        for r in first_rows(T0_MIX, 8)
    ]
    data = write_lines(work / "chat.jsonl", [json.dumps(r) for r in rows])
    before = files_in(work)
    out = work / "out.csv"
    result = select(data, "-k", "3", "--embedding-field", "vec", "-o", out, "-q")
    assert_fails(result, 2, f"{out}: CSV cannot hold the nested column(s) messages", work=work, before=before)


def test_unknown_file_type(work):
    data = work / "data.txt"
    data.write_text("hello\n")
    before = files_in(work)
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 2, f"{data}: unknown file type", work=work, before=before)


def test_missing_input_file(work):
    before = files_in(work)
    data = work / "nothere.jsonl"
    result = select(data, "-k", "2", "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 2, f"{data}: no such file", work=work, before=before)


def test_unknown_method_name_is_refused_by_the_parser(work):
    data = vector_file(work)
    before = files_in(work)
    result = CliRunner().invoke(app, ["select", "--method", "nope", str(data), "-k", "2", "-o", str(work / "o.jsonl")])
    assert result.exit_code == 2
    assert "nope" in result.stderr
    assert files_in(work) == before


# --------------------------------------------------------------------------- --config

def test_config_with_an_unknown_key(work):
    data = vector_file(work)
    config = work / "run.yaml"
    config.write_text("embedding-field: vec\nk: 3\ntopk: 5\n")
    before = files_in(work)
    result = select(data, "--config", config, "-o", work / "out.jsonl")
    assert_fails(result, 2, f"{config}: unknown key 'topk'", "known keys:", "embedding-field", work=work, before=before)


def test_config_with_a_bad_value(work):
    data = vector_file(work)
    config = work / "run.yaml"
    config.write_text("embedding-field: vec\nk: many\n")
    before = files_in(work)
    result = select(data, "--config", config, "-o", work / "out.jsonl")
    assert_fails(result, 2, f"{config}: key 'k'", work=work, before=before)


def test_config_that_is_not_a_mapping(work):
    data = vector_file(work)
    config = work / "run.yaml"
    config.write_text("- k\n- 3\n")
    before = files_in(work)
    result = select(data, "--config", config, "--embedding-field", "vec", "-o", work / "out.jsonl")
    assert_fails(result, 2, f"--config {config}: expected a mapping", work=work, before=before)


def test_config_sets_k_and_a_flag_overrides_it(work):
    data = vector_file(work)
    config = work / "run.yaml"
    config.write_text("k: 3\nembedding_field: vec\nmetric: l2\n")

    result = select(data, "--config", config, "-o", work / "from_config.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_out"] == 3
    assert summary["figures"]["metric"] == "l2"

    result = select(data, "--config", config, "-k", "5", "-o", work / "overridden.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows_out"] == 5
    record = json.loads((work / "overridden.jsonl.dyn.json").read_text())
    assert record["arguments"]["k"] == 5
    assert record["arguments"]["embedding_field"] == "vec"
    assert record["arguments"]["metric"] == "l2"


# --------------------------------------------------------------------------- successful runs

def test_json_prints_exactly_one_object_on_stdout(work):
    data = vector_file(work, n=12)
    out = work / "out.parquet"
    result = select(data, "-k", "4", "--embedding-field", "vec", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert isinstance(summary, dict)
    assert result.stdout.count("\n") == 1
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["rows_in"] == 12 and summary["rows_out"] == 4
    assert summary["output"] == str(out)
    assert summary["run_record"] == f"{out}.dyn.json"
    assert summary["figures"]["hmin"] > 0
    assert out.is_file() and Path(summary["run_record"]).is_file()
    assert files_in(work) == {"data.jsonl", "out.parquet", "out.parquet.dyn.json"}


def test_default_text_path_on_a_tiny_file(work, tmp_path):
    """No text flag: prompt + completion are embedded with the bundled MiniLM, cached under
    DYN_CACHE_DIR (this test's tmp folder), and a rerun reads the cache."""
    rows = first_rows(T0_MIX, 8)
    data = write_lines(work / "mix.jsonl", [json.dumps(r) for r in rows])
    out = work / "picked.jsonl"
    result = select(data, "-k", "3", "-o", out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows_out"] == 3
    picked = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(picked) == 3
    for row in picked:
        assert set(row) >= {"prompt", "completion", "task", "dyn_index", "dyn_rank"}
        assert {k: row[k] for k in ("prompt", "completion", "task")} == rows[row["dyn_index"]]
    record = json.loads((work / "picked.jsonl.dyn.json").read_text())
    assert record["models"][0]["role"] == "embedding"
    assert record["models"][0]["text"] == "template '{prompt}\\n{completion}'"
    assert record["figures_embedding"]["embedded"] == 8
    cache = tmp_path / "cache"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))

    again = select(data, "-k", "3", "-o", work / "again.jsonl", "--json", "--device", "cpu")
    assert again.exit_code == 0, again.stderr
    record = json.loads((work / "again.jsonl.dyn.json").read_text())
    assert record["figures_embedding"]["from_cache"] == 8
    assert record["figures_embedding"]["embedded"] == 0


# --------------------------------------------------------------------------- the real console script

def _dyn_command() -> list[str]:
    exe = shutil.which("dyn")
    return [exe] if exe else [sys.executable, "-m", "dyn.cli"]


def test_console_script_exit_codes_and_streams(work):
    env = {k: v for k, v in os.environ.items() if k not in ("DYN_DEBUG", "WORLD_SIZE")}
    bad = vector_file(work, name="bad.jsonl", replace={3: "{not json"})
    before = files_in(work)
    proc = subprocess.run(
        [*_dyn_command(), "select", "--method", "hmin", str(bad), "-k", "2", "--embedding-field", "vec",
         "-o", str(work / "out.jsonl")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dyn: error: {bad} line 3: malformed JSON (")
    assert lines[0].endswith("fix it or pass --skip-bad-rows")
    assert files_in(work) == before

    proc = subprocess.run(
        [*_dyn_command(), "select", "--method", "hmin", str(bad), "-k", "0", "--embedding-field", "vec",
         "-o", str(work / "out.jsonl")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "dyn: error: -k 0: must be at least 1"

    proc = subprocess.run(
        [*_dyn_command(), "select", "--method", "hmin", str(bad), "-k", "4", "--embedding-field", "vec",
         "--skip-bad-rows", "-o", str(work / "out.jsonl"), "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["rows_out"] == 4 and summary["skipped_rows"] == {"malformed JSON line": 1}
    assert json.loads((work / "out.jsonl.dyn.json").read_text())["skipped_rows"] == {"malformed JSON line": 1}
