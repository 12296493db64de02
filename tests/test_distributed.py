"""A multi-process run (gloo on CPU) gives the same bytes as one process."""

from __future__ import annotations

import os
import subprocess

import pytest


def _run(args: list[str], env_cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DYN_CACHE_DIR": env_cache}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def mix(tmp_path, t0_rows, write_jsonl):
    return write_jsonl(tmp_path / "mix.jsonl", t0_rows(120))


def test_two_processes_give_byte_identical_output(mix, tmp_path):
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["select", "--method", "hmin", str(mix), "-k", "20", "--group-field", "task", "-q"]
    one = _run(["dyn", *common, "-o", str(single)], str(tmp_path / "cache1"))
    assert one.returncode == 0, one.stderr
    two = _run(["dyn", *common, "-o", str(double), "--num-processes", "2"], str(tmp_path / "cache2"))
    assert two.returncode == 0, two.stderr
    assert single.read_bytes() == double.read_bytes()
    import json

    record = json.loads((tmp_path / "two.jsonl.dyn.json").read_text())
    assert record["world_size"] == 2
    assert record["figures_embedding"]["embedded"] == 120


def test_accelerate_launch_over_gloo(mix, tmp_path):
    """`accelerate launch` starting two workers on a CPU machine (its --cpu mode alone would start
    one process unless MPI is set up, so --multi_gpu asks for the torchrun-style launcher)."""
    single, launched = tmp_path / "one.parquet", tmp_path / "acc.parquet"
    common = ["select", str(mix), "-k", "15", "-q"]
    assert _run(["dyn", *common, "-o", str(single)], str(tmp_path / "c1")).returncode == 0
    result = _run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dyn.cli", *common, "-o", str(launched)],
        str(tmp_path / "c2"),
    )
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(single).equals(pq.read_table(launched))
    import json

    assert json.loads((tmp_path / "acc.parquet.dyn.json").read_text())["world_size"] == 2
