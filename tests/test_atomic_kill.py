"""A run killed with SIGKILL leaves no output that looks complete."""

from __future__ import annotations

import subprocess
import sys
import time


def test_sigkill_inside_a_write_leaves_no_output(tmp_path):
    out = tmp_path / "picked.jsonl"
    code = f"""
import os, signal
from dyn.core.atomic import atomic_output
with atomic_output({str(out)!r}) as tmp:
    with open(tmp, "w") as handle:
        handle.write('{{"half": ')
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(".dyn-tmp-" in name and name.startswith(".") for name in leftovers)


def test_sigkill_mid_run_leaves_no_output_or_record(tmp_path, t0_rows, write_jsonl):
    data = write_jsonl(tmp_path / "mix.jsonl", t0_rows(400))
    out = tmp_path / "picked.jsonl"
    proc = subprocess.Popen(["dyn", "select", str(data), "-k", "50", "-o", str(out), "--no-cache"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(5)  # loading the model or embedding: 400 rows take well over 5 s here
    assert proc.poll() is None, "the run should still be working when killed"
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run should still have been working when killed"
    assert not out.exists() and not (tmp_path / "picked.jsonl.dyn.json").exists()
