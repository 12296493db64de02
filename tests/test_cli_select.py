"""`dyn select --method hmin` end to end on a slice of the real instruction mix, with the real MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dyn.cli.app import app

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def mix(tmp_path, t0_rows, write_jsonl):
    rows = t0_rows(200)
    return rows, write_jsonl(tmp_path / "mix.jsonl", rows)


def test_select_writes_rows_columns_and_run_record(mix, tmp_path):
    rows, data = mix
    out = tmp_path / "picked.jsonl"
    result = run_cli("select", "--method", "hmin", str(data), "-k", "25", "--template", "{prompt}\n{completion}",
                     "--group-field", "task", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    picked = read_jsonl(out)
    assert len(picked) == 25
    assert [r["dyn_rank"] for r in picked] == list(range(25))
    for row in picked:
        source = rows[row["dyn_index"]]
        assert {k: row[k] for k in source} == source, "every input column kept, dyn_index points at the input row"
    distances = [r["dyn_hmin_at"] for r in picked]
    assert distances[0] is None and all(a >= b - 1e-9 for a, b in zip(distances[1:], distances[2:]))

    record = json.loads((tmp_path / "picked.jsonl.dyn.json").read_text())
    assert record["command"] == "select --method hmin"
    assert record["arguments"]["k"] == 25 and record["arguments"]["template"] == "{prompt}\n{completion}"
    assert record["inputs"][0]["rows"] == 200 and len(record["inputs"][0]["sha256"]) == 64
    assert record["models"][0]["role"] == "embedding" and len(record["models"][0]["sha256"]) == 64
    assert {"torch", "transformers", "datasets", "faiss-cpu"} <= set(record["libraries"])
    assert {"read", "embed", "greedy", "measure", "write"} <= set(record["timings_s"])
    figures = record["figures"]
    assert figures["hmin"] == pytest.approx(distances[-1], rel=1e-4)
    assert figures["hmin"] > figures["hmin_random"]
    assert 0 < figures["groups_covered"] <= figures["groups_total"]
    assert figures["coverage_radius"] > 0 and figures["coverage_radius_random"] > 0

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_out"] == 25 and summary["figures"]["hmin"] == figures["hmin"]


def test_rerun_with_another_k_embeds_nothing_and_is_a_prefix(mix, tmp_path):
    _, data = mix
    big, small = tmp_path / "big.parquet", tmp_path / "small.jsonl"
    assert run_cli("select", str(data), "-k", "40", "-o", str(big), "-q").exit_code == 0
    assert run_cli("select", str(data), "-k", "15", "-o", str(small), "-q").exit_code == 0
    record = json.loads((tmp_path / "small.jsonl.dyn.json").read_text())
    assert record["figures_embedding"]["embedded"] == 0
    assert record["figures_embedding"]["from_cache"] == record["figures_embedding"]["unique_texts"]
    import pyarrow.parquet as pq

    big_indices = pq.read_table(big).column("dyn_index").to_pylist()
    assert [r["dyn_index"] for r in read_jsonl(small)] == big_indices[:15]


def test_stratify_balances_groups(mix, tmp_path):
    rows, data = mix
    out = tmp_path / "strat.jsonl"
    result = run_cli("select", str(data), "--fraction", "0.25", "--stratify", "task", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    picked = read_jsonl(out)
    assert len(picked) == 50
    assert all(r["dyn_group"] == r["task"] for r in picked)
    record = json.loads((tmp_path / "strat.jsonl.dyn.json").read_text())
    assert record["figures"]["stratified"] is True
    assert record["figures"]["groups_covered"] >= record["figures"]["groups_covered_random"] - 5


def test_config_file_sets_flags_and_flags_win(mix, tmp_path):
    _, data = mix
    config = tmp_path / "run.yaml"
    config.write_text('k: 12\nseed: 3\ntemplate: "{prompt}\\n{completion}"\nstart: medoid\n')
    out = tmp_path / "c.jsonl"
    result = run_cli("select", str(data), "--config", str(config), "-k", "7", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "c.jsonl.dyn.json").read_text())
    assert record["arguments"]["k"] == 7 and record["arguments"]["seed"] == 3
    assert record["arguments"]["template"] == "{prompt}\n{completion}" and record["arguments"]["start"] == "medoid"
    assert len(read_jsonl(out)) == 7


def test_chained_run_keeps_the_original_index_and_names_the_parent(mix, tmp_path):
    rows, data = mix
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert run_cli("select", str(data), "-k", "30", "-o", str(first), "-q").exit_code == 0
    assert run_cli("select", str(first), "-k", "10", "-o", str(second), "-q").exit_code == 0
    for row in read_jsonl(second):
        assert row["prompt"] == rows[row["dyn_index"]]["prompt"]
    record = json.loads((tmp_path / "second.jsonl.dyn.json").read_text())
    assert record["inputs"][0]["parent_run_record"].endswith("first.jsonl.dyn.json")


def test_save_to_disk_output_folder(mix, tmp_path):
    import datasets

    _, data = mix
    out = tmp_path / "picked_folder"
    assert run_cli("select", str(data), "-k", "5", "-o", str(out), "-q").exit_code == 0
    loaded = datasets.load_from_disk(str(out))
    assert len(loaded) == 5 and "dyn_rank" in loaded.column_names
    assert (out / "run.json").is_file()


@pytest.mark.parametrize("command", [[], ["select"]])
def test_help_ends_with_examples(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "dyn select --method hmin" in result.output


def test_help_imports_no_heavy_library():
    code = "import sys; import dyn.cli.app; print(sorted(m for m in ('torch','transformers','faiss','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_reports_exit_codes(tmp_path):
    missing = subprocess.run(["dyn", "select", str(tmp_path / "nope.jsonl"), "-k", "3", "-o", str(tmp_path / "o.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"dyn: error: {tmp_path / 'nope.jsonl'}: no such file or folder"]


def test_stratify_over_kmeans_clusters(mix, tmp_path):
    _, data = mix
    out = tmp_path / "clusters.jsonl"
    result = run_cli("select", str(data), "-k", "40", "--stratify-clusters", "4", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    picked = read_jsonl(out)
    assert len(picked) == 40 and {r["dyn_group"] for r in picked} <= {0, 1, 2, 3}
    record = json.loads((tmp_path / "clusters.jsonl.dyn.json").read_text())
    assert record["figures"]["stratified"] is True and record["figures"]["groups_total"] == 4
    assert "cluster" in record["timings_s"]
    both = run_cli("select", str(data), "-k", "4", "--stratify", "task", "--stratify-clusters", "4", "-o", str(tmp_path / "x.jsonl"))
    assert both.exit_code == 2


def test_inspect_shows_columns_and_the_run_record(mix, tmp_path):
    _, data = mix
    out = tmp_path / "few.jsonl"
    assert run_cli("select", str(data), "-k", "4", "-o", str(out), "-q").exit_code == 0
    result = run_cli("inspect", str(out), "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["rows"] == 4 and {"prompt", "dyn_index", "dyn_rank", "dyn_hmin_at"} <= set(info["columns"])
    assert info["run_record"]["command"] == "select --method hmin" and "hmin" in info["run_record"]["figures"]
    text = run_cli("inspect", str(out))
    assert text.exit_code == 0 and "4 rows" in text.stdout and "run record: select --method hmin" in text.stdout
    missing = run_cli("inspect", str(tmp_path / "absent.jsonl"))
    assert missing.exit_code == 2


def test_score_ranks_every_row_in_input_order(mix, tmp_path):
    rows, data = mix
    scored, picked = tmp_path / "scored.parquet", tmp_path / "picked.jsonl"
    template = "{prompt}\n{completion}"
    result = run_cli("score", "--method", "hmin", str(data), "--template", template, "--plot", "-o", str(scored))
    assert result.exit_code == 0, result.output
    assert run_cli("select", "--method", "hmin", str(data), "-k", "40", "--template", template, "-o", str(picked)).exit_code == 0
    import pyarrow.parquet as pq

    table = pq.read_table(scored).to_pylist()
    assert [r["dyn_index"] for r in table] == list(range(len(rows)))
    assert sorted(r["dyn_rank"] for r in table) == list(range(len(rows)))
    by_rank = sorted(table, key=lambda r: r["dyn_rank"])
    assert [r["dyn_index"] for r in by_rank[:40]] == [r["dyn_index"] for r in read_jsonl(picked)], "the select order is a prefix"
    assert json.loads((tmp_path / "scored.parquet.dyn.json").read_text())["command"] == "score --method hmin"
    assert (tmp_path / "scored.parquet.scores.png").stat().st_size > 1000
    refused = run_cli("score", "--method", "hmin", str(data), "-k", "5", "-o", str(tmp_path / "x.jsonl"))
    assert refused.exit_code == 2 and "dyn score keeps every row" in refused.stderr
