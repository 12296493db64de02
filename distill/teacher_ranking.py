"""The `dyn teachers rank` recipe (GRACE; DESIGN §4.4): candidates' responses in -> the student's
projected per-response gradients -> each candidate's GRACE score -> the ranking, best (lowest)
first -> ranking.json + run record (+ a PNG with --plot).

A plain sequence of library calls; `dyn teachers rank` parses flags into a `TeacherRankRequest`
and calls `run_teacher_ranking`:

1. candidates: each `--teacher` at each `--temperature` generates G responses to each of the first
   n prompts (`distill.generations`, reused from `<output>.generations/` on reruns), and each
   `--responses NAME=FILE` is read; all must answer the same prompts;
2. the student tokenises every (prompt, response) as `dyn train` would (prompt + separator, or its
   chat template; loss on the response tokens plus EOS); responses left with no response token
   (empty, or cut away by `--max-length`) are counted by reason, warned about and left out, and
   prompts that some candidate has no usable response to are left out for every candidate, so all
   candidates are scored on the same prompt-level splits;
3. per-response gradients at the student's weights, projected to `--dim` and divided by
   √(#parameters) (`distill.grace_gradients`), one pass over all candidates' rows, shared out over
   the ranks;
4. `distill.grace.grace_score` per candidate, `rank_candidates`, degenerate-response warnings.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dyn.core.errors import DataError, UsageError


@dataclass
class TeacherRankRequest:
    student: str
    output: str
    teacher: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    prompts: str | None = None
    prompt_field: str = "prompt"
    template: str | None = None
    separator: str = "\n"
    n: int | None = None
    responses_per_prompt: int | None = None  # -g; default 4 when generating
    temperature: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None  # default 256 when generating
    dim: int = 512
    projection: str = "factored"
    modules: str | None = None
    nu: float = 1e-3
    num_splits: int = 10
    seed: int = 0
    max_length: int | None = None
    batch_tokens: int | None = None
    device: str = "auto"
    regenerate: bool = False
    plot: bool = False
    extra: dict = field(default_factory=dict)


DEFAULT_RESPONSES_PER_PROMPT = 4
DEFAULT_MAX_NEW_TOKENS = 256
STUDENT_UNKNOWN_WARN_RATE = 0.01
PROMPT_LEFT_OUT = "prompt left out for every candidate"


@dataclass
class CheckedRequest:
    teachers: list[tuple[str, str]]
    responses: list[tuple[str, str]]
    temperatures: list[float]
    g: int
    max_new_tokens: int


def check_request(req: TeacherRankRequest) -> CheckedRequest:
    """Flag checks that need no data, so a bad command fails before any work."""
    from dyn.core.io import check_output_path
    from dyn.distill.generations import candidate_name, generations_folder, parse_named, parse_temperatures
    from dyn.distill.grace import DEFAULT_NUM_SPLITS, MIN_PROMPTS, MIN_RESPONSES_PER_PROMPT, check_nu
    from dyn.distill.grace_gradients import check_projection

    if not req.student:
        raise UsageError("--student DIR is required: the student model folder (or a PEFT adapter folder) whose gradients GRACE reads")
    if not Path(req.student).is_dir():
        raise UsageError(f"--student {req.student}: not a folder (a causal LM saved with save_pretrained, with its tokenizer)")
    teachers = [parse_named(spec, "--teacher") for spec in req.teacher or []]
    responses = [parse_named(spec, "--responses") for spec in req.responses or []]
    if not teachers and not responses:
        raise UsageError("give candidates: --teacher NAME=DIR (generates responses to --prompts) and/or --responses NAME=FILE")
    for name, folder in teachers:
        if not Path(folder).is_dir():
            raise UsageError(f"--teacher {name}={folder}: not a folder (a causal LM saved with save_pretrained, e.g. a `dyn train` run or checkpoint)")
    if teachers and not req.prompts:
        raise UsageError("--teacher needs --prompts FILE: the prompts the teachers answer")
    if not teachers:
        given = [flag for flag, value in (("--prompts", req.prompts), ("-g", req.responses_per_prompt),
                                          ("--temperature", req.temperature), ("--max-new-tokens", req.max_new_tokens)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} set how teachers generate; this run has no --teacher "
                             "(--responses files bring their own prompts and responses)")
    g = DEFAULT_RESPONSES_PER_PROMPT if req.responses_per_prompt is None else req.responses_per_prompt
    if g < MIN_RESPONSES_PER_PROMPT:
        raise UsageError(f"-g {g}: GRACE needs at least {MIN_RESPONSES_PER_PROMPT} responses per prompt (several samples "
                         "show how the teacher's answers to one prompt vary, e.g. -g 4)")
    if req.n is not None and req.n < MIN_PROMPTS:
        raise UsageError(f"-n {req.n}: {_few_prompts_reason(req.n)}")
    max_new = DEFAULT_MAX_NEW_TOKENS if req.max_new_tokens is None else req.max_new_tokens
    if max_new < 1:
        raise UsageError(f"--max-new-tokens {max_new}: must be at least 1")
    temperatures = parse_temperatures(req.temperature)
    check_projection(req.projection, req.dim)
    check_nu(req.nu)
    if req.num_splits < 1:
        raise UsageError(f"--num-splits {req.num_splits}: must be at least 1 (GRACE's default is {DEFAULT_NUM_SPLITS})")
    if req.max_length is not None and req.max_length < 2:
        raise UsageError(f"--max-length {req.max_length}: must be at least 2")
    if req.batch_tokens is not None and req.batch_tokens < 16:
        raise UsageError(f"--batch-tokens {req.batch_tokens}: must be at least 16")
    names = [candidate_name(n, t) for n, _ in teachers for t in temperatures] + [n for n, _ in responses]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"two candidates are named {duplicate!r}; name them apart with NAME=PATH")
    if not req.output.endswith(".json"):
        raise UsageError(f"-o {req.output}: the ranking is a JSON file; name it e.g. ranking.json")
    inputs = [req.student] + [f for _, f in teachers] + [f for _, f in responses] + ([req.prompts] if req.prompts else [])
    check_output_path(req.output, inputs)
    written = {(generations_folder(req.output) / f"{candidate_name(n, t)}.jsonl").resolve() for n, _ in teachers for t in temperatures}
    for name, path in responses:
        if Path(path).resolve() in written:
            raise UsageError(f"--responses {name}={path}: this run regenerates that file; copy it elsewhere first")
    if req.plot:
        from dyn.core.plot import check_plotting_available

        check_plotting_available()
    return CheckedRequest(teachers, responses, temperatures, g, max_new)


def _few_prompts_reason(count: int) -> str:
    from dyn.distill.grace import DEFAULT_NUM_SPLITS, HOLDOUT_FRACTION, MIN_PROMPTS

    return (f"GRACE needs at least {MIN_PROMPTS} prompts, got {count}: it compares the student's gradients on "
            f"{HOLDOUT_FRACTION:.0%} of the prompts, held out, with the spread of its gradients on the other "
            f"{1 - HOLDOUT_FRACTION:.0%}, over {DEFAULT_NUM_SPLITS} prompt-level splits, so it needs at least {MIN_PROMPTS} to hold one out "
            f"(hundreds give a stable ranking)")


def run_teacher_ranking(req: TeacherRankRequest) -> dict | None:
    """Rank the candidates; returns the summary on rank 0 (None on other ranks)."""
    from dyn.core import progress
    from dyn.core.distributed import world
    from dyn.core.embeddings import resolve_device
    from dyn.core.runrecord import RunRecord, record_path
    from dyn.distill.grace import grace_score, rank_candidates
    from dyn.distill.grace_gradients import GraceGradients, make_projection, projected_gradients

    checked = check_request(req)
    w = world()
    record = RunRecord("teachers rank", {k: v for k, v in asdict(req).items() if k != "extra"} | req.extra)
    record.data["world_size"] = w.size
    device = resolve_device(req.device)
    record.data["device"] = device
    record.data["seeds"] = {"projection": req.seed, "splits": req.seed, "generation": req.seed}

    with record.phase("load student"):
        student, tokenizer, params = _load_student(req, device)
    with record.phase("candidates"):
        prompts, candidates, teacher_figures = _candidates(req, checked, device)
    with record.phase("tokenize"):
        rows, usable, token_figures = _student_rows(req, student, tokenizer, candidates, device)
    with record.phase("project"):
        projection = make_projection(req.projection, params, req.dim, req.seed, device=device)
    gradients = GraceGradients(student, params, projection)
    progress.info(f"student gradients of {len(rows)} responses over {len(candidates)} candidates "
                  f"({params.numel:,} parameters -> {req.dim} dims, {projection.kind} projection, {gradients.route})")
    with record.phase("gradients"):
        try:
            features = projected_gradients(gradients, rows, "student gradients")
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise UsageError(f"out of memory computing student gradients on {device}; lower --batch-tokens or --max-length") from None
    if not w.is_main:
        return None

    results, per_candidate = {}, {}
    with record.phase("score"):
        for index, candidate in enumerate(candidates):
            members = np.flatnonzero(rows.groups == index)
            ids = [usable[index].prompt_ids[k] for k in range(len(members))]
            results[candidate.name] = grace_score(features[members], np.asarray(ids), nu=req.nu, seed=req.seed, num_splits=req.num_splits)
    ranked = rank_candidates(results)
    for index, candidate in enumerate(candidates):
        per_candidate[candidate.name] = _candidate_entry(candidate, usable[index], token_figures["candidates"][candidate.name])
    ranking = _ranking_json(req, checked, prompts, ranked, per_candidate, projection, params, token_figures)
    for entry in ranking["candidates"]:
        for line in entry["warnings"]:
            progress.warn(line)
    from dyn.core.atomic import write_text_atomic

    with record.phase("write"):
        write_text_atomic(req.output, json.dumps(ranking, indent=2, ensure_ascii=False) + "\n")
    plot = None
    if req.plot:
        plot = write_ranking_plot(req.output, ranking)
    if req.prompts:
        record.add_input(req.prompts, prompts.rows_in_source, role="prompts")
    for candidate in candidates:
        if not candidate.generated:
            record.add_input(candidate.source, candidate.rows_in_source, role=f"responses {candidate.name}")
    from dyn.core.models import ModelSource, model_content_hash

    record.add_model("student", req.student, model_content_hash(ModelSource("folder", req.student)), parameters=params.describe())
    for name, folder in checked.teachers:
        record.add_model(f"teacher {name}", folder, teacher_figures[name]["sha256"])
    record.data["figures"] = {
        "teachers": teacher_figures,
        "tokens": token_figures,
        "projection": projection.describe() | {"route": gradients.route, "parameters": params.numel},
        "ranking": [{"name": e["name"], "score": e["score"]} for e in ranking["candidates"]],
    }
    run_record = record_path(req.output)
    record.write(run_record)
    return {
        "output": req.output,
        "run_record": run_record,
        "plot": plot,
        "generations": str(Path(f"{req.output}.generations")) if checked.teachers else None,
        "prompts": ranking["prompts"],
        "candidates": ranking["candidates"],
        "best": ranking["candidates"][0]["name"],
        "timings_s": record.data["timings_s"],
    }


# --------------------------------------------------------------------------- steps

def _load_student(req: TeacherRankRequest, device: str):
    """The student in eval mode, float32, with eager attention (the kernels the gradient oracle
    uses), its tokenizer and the scored parameters (all, `--modules`, or a PEFT adapter's LoRA)."""
    from dyn.core.models import load_model_and_tokenizer
    from dyn.influence.parameters import select_parameters

    model, tokenizer = load_model_and_tokenizer(req.student, attn_implementation="eager", flag="--student")
    model = model.float().eval().to(device)
    return model, tokenizer, select_parameters(model, req.modules)


def _candidates(req: TeacherRankRequest, checked: CheckedRequest, device: str):
    """Every candidate's responses, restricted to and checked against one prompt set."""
    from dyn.distill.generations import (
        GenerationSettings, check_same_prompts, check_several_responses, check_teacher, read_prompts,
        read_responses_file, reference_prompts, restrict_to, teacher_candidates,
    )
    from dyn.distill.grace import MIN_PROMPTS

    candidates, teacher_figures = [], {}
    files = [read_responses_file(name, path) for name, path in checked.responses]
    if checked.teachers:
        prompts = read_prompts(req.prompts, req.prompt_field, req.template, req.n)
    else:
        prompts = reference_prompts(files[0], req.n)
    if len(prompts.ids) < MIN_PROMPTS:
        raise DataError(f"{prompts.source}: has {len(prompts.ids)} prompts; {_few_prompts_reason(len(prompts.ids))}")
    settings = GenerationSettings(checked.temperatures[0], checked.max_new_tokens, checked.g, req.seed, req.separator)
    plans = [check_teacher(name, folder, prompts, settings) for name, folder in checked.teachers]
    checked_files = []
    for candidate in files:
        if req.n is not None:
            candidate = restrict_to(candidate, prompts)
        check_same_prompts(candidate, prompts)
        check_several_responses(candidate)
        checked_files.append(candidate)
    for plan in plans:  # every input is checked before anything is generated
        generated, figures = teacher_candidates(plan, prompts, checked.temperatures, settings, req.output, device,
                                                regenerate=req.regenerate)
        candidates.extend(generated)
        teacher_figures[plan.name] = figures
    return prompts, candidates + checked_files, teacher_figures


def _student_rows(req: TeacherRankRequest, model, tokenizer, candidates, device: str):
    """Student token ids of every usable response of every candidate, planned into token-budget
    batches that never mix candidates (group = candidate index). Returns the batches, each
    candidate's usable rows (in the batches' row order) and token figures."""
    from dyn.core import progress
    from dyn.core.lm import LMExamples, encode_prompt_response, pad_token_id
    from dyn.core.lm_batches import default_batch_tokens, plan_row_batches
    from dyn.core.models import context_length
    from dyn.distill.grace import MIN_PROMPTS

    context = context_length(model.config)
    max_length = req.max_length or context
    if max_length > context:
        raise UsageError(f"--max-length {max_length}: the student attends over at most {context} positions")
    encoded, figures = [], {}
    for candidate in candidates:
        prompts = student_prompts(tokenizer, candidate.prompts, req.separator)
        examples = encode_prompt_response(prompts, candidate.responses, tokenizer, max_length)
        encoded.append(examples)
        figures[candidate.name] = examples.figures() | _unknown_tokens(examples, tokenizer)
        left_out = dict(examples.no_response)
        if left_out:
            what = "; ".join(f"{reason}: {k}" for reason, k in left_out.items())
            progress.warn(f"candidate {candidate.name!r}: {sum(left_out.values())} of {len(candidate)} responses have no "
                          f"response token for the student and are left out ({what})")
        if figures[candidate.name]["unknown_token_rate"] > STUDENT_UNKNOWN_WARN_RATE:
            progress.warn(f"candidate {candidate.name!r}: {figures[candidate.name]['unknown_token_rate']:.1%} of the tokens are the "
                          f"student's unknown token: its vocabulary does not cover these responses")

    # prompts every candidate has a usable response to: the same splits for all
    usable_prompts = None
    for candidate, examples in zip(candidates, encoded):
        have = {candidate.prompt_ids[i] for i in examples.with_response()}
        usable_prompts = have if usable_prompts is None else usable_prompts & have
    all_prompts = {pid for c in candidates for pid in c.prompt_ids}
    dropped_prompts = sorted(all_prompts - usable_prompts, key=str)
    if dropped_prompts:
        progress.warn(f"{len(dropped_prompts)} prompts are left out for every candidate because some candidate has no usable "
                      f"response to them (first: {dropped_prompts[0]!r}); GRACE compares candidates on the same prompts")
    if len(usable_prompts) < MIN_PROMPTS:
        raise DataError(f"only {len(usable_prompts)} prompts have a usable response from every candidate; "
                        f"{_few_prompts_reason(len(usable_prompts))}")

    ids, prompt_lengths, counts, truncated, groups, usable, wheres = [], [], [], [], [], [], []
    for index, (candidate, examples) in enumerate(zip(candidates, encoded)):
        keep = np.array([i for i in examples.with_response() if candidate.prompt_ids[i] in usable_prompts], dtype=np.int64)
        selected = candidate.select(keep)
        counts_by_prompt = Counter(selected.prompt_ids)
        if max(counts_by_prompt.values()) < 2:
            raise DataError(f"candidate {candidate.name!r} ({candidate.source}): no prompt keeps 2 usable responses; "
                            f"GRACE needs G ≥ 2 responses per prompt")
        usable.append(selected)
        figures[candidate.name]["responses_scored"] = int(len(keep))
        left_out = {reason: int(k) for reason, k in examples.no_response.items()}
        if len(examples.with_response()) > len(keep):
            left_out[PROMPT_LEFT_OUT] = int(len(examples.with_response()) - len(keep))
        figures[candidate.name]["responses_left_out"] = left_out
        for i in keep:
            ids.append(examples.input_ids[i])
            prompt_lengths.append(examples.prompt_lengths[i])
            counts.append(examples.response_tokens[i])
            truncated.append(examples.truncated[i])
            groups.append(index)
            wheres.append(candidate.where(int(i)))
    combined = LMExamples(ids, np.asarray(prompt_lengths, dtype=np.int64), np.asarray(counts, dtype=np.int64),
                          np.asarray(truncated, dtype=bool), max_length=max_length)
    budget = req.batch_tokens or default_batch_tokens(device)
    budget = max(budget, int(combined.lengths.max()))
    rows = plan_row_batches(combined, pad_token_id(tokenizer), lambda i: wheres[i], budget,
                            groups=np.asarray(groups, dtype=np.int64), group_names=[c.name for c in candidates], device=device)
    token_figures = {"max_length": max_length, "batch_tokens": budget, "prompts_left_out": len(dropped_prompts),
                     "prompts_scored": len(usable_prompts), "candidates": figures}
    return rows, usable, token_figures


def student_prompts(tokenizer, prompts, separator: str) -> list[str]:
    """The prompt part of the student's examples: its chat template (one user turn) when it has
    one, else prompt + separator, as `dyn train` lays out a row."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    return [p + separator for p in prompts]


def _unknown_tokens(examples, tokenizer) -> dict:
    unk = tokenizer.unk_token_id
    total = int(examples.lengths.sum())
    if unk is None or total == 0:
        return {"unknown_tokens": 0, "unknown_token_rate": 0.0}
    unknown = int(sum(int((ids == unk).sum()) for ids in examples.input_ids))
    return {"unknown_tokens": unknown, "unknown_token_rate": unknown / total}


# --------------------------------------------------------------------------- output

def _candidate_entry(candidate, usable, token_figures: dict) -> dict:
    from dyn.distill.grace import degenerate_response_counts, degenerate_warnings

    counts = degenerate_response_counts(candidate.prompt_ids, candidate.responses, candidate.truncated)
    warnings = degenerate_warnings(counts, candidate.name)
    left = token_figures["responses_left_out"]
    unusable = sum(k for reason, k in left.items() if reason != PROMPT_LEFT_OUT)
    if unusable:
        warnings.append(f"candidate {candidate.name!r}: {unusable} responses have no response token for the student and were "
                        f"left out (" + "; ".join(f"{r}: {k}" for r, k in left.items() if r != PROMPT_LEFT_OUT) + ")")
    if token_figures["unknown_token_rate"] > STUDENT_UNKNOWN_WARN_RATE:
        warnings.append(f"candidate {candidate.name!r}: {token_figures['unknown_token_rate']:.1%} of the tokens are the "
                        f"student's unknown token")
    return {
        **candidate.describe(),
        "counts": {"responses": len(candidate), "responses_scored": token_figures["responses_scored"],
                   "responses_left_out": left, "prompts": len(set(candidate.prompt_ids)),
                   "prompts_scored": len(set(usable.prompt_ids)),
                   "empty": counts.empty, "repeated": counts.repeated, "truncated": counts.truncated,
                   "prompts_all_identical": counts.prompts_all_identical},
        "warnings": warnings,
    }


def _ranking_json(req, checked, prompts, ranked, per_candidate, projection, params, token_figures) -> dict:
    candidates = []
    for place, (name, result) in enumerate(ranked, start=1):
        entry = per_candidate[name]
        candidates.append({
            "rank": place,
            "name": name,
            "score": result.score,
            "split_std": result.split_std,
            "split_scores": list(result.split_scores),
            "heldout_grad_norm": result.heldout_grad_norm,
            "spectrum_entropy": result.spectrum_entropy,
            **{k: entry[k] for k in ("teacher", "temperature", "responses_file", "generated")},
            "counts": entry["counts"],
            "warnings": entry["warnings"],
        })
    first = ranked[0][1]
    return {
        "method": "GRACE",
        "lower_is_better": True,
        "student": req.student,
        "prompts": {"source": prompts.source, "count": len(prompts.ids), "scored": token_figures["prompts_scored"],
                    "left_out": token_figures["prompts_left_out"]},
        "settings": {"dim": req.dim, "projection": projection.describe(), "parameters": params.numel, "nu": req.nu,
                     "num_splits": req.num_splits, "seed": req.seed, "splits_digest": first.splits_digest,
                     "max_length": token_figures["max_length"],
                     "generation": None if not checked.teachers else {
                         "responses_per_prompt": checked.g, "temperatures": checked.temperatures,
                         "max_new_tokens": checked.max_new_tokens}},
        "candidates": candidates,
    }


def ranking_plot_path(output: str) -> str:
    from dyn.core.plot import score_plot_path

    return score_plot_path(output)


def write_ranking_plot(output: str, ranking: dict) -> str:
    """A bar per candidate (best first) of its GRACE score, with the spread over splits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dyn.core.atomic import atomic_output

    path = ranking_plot_path(output)
    entries = ranking["candidates"]
    names = [e["name"] for e in entries]
    scores = [e["score"] for e in entries]
    spread = [e["split_std"] for e in entries]
    figure, axes = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4), dpi=110)
    colors = ["#d0603a"] + ["#9aa7b8"] * (len(names) - 1)
    axes.bar(range(len(names)), scores, yerr=spread, color=colors, capsize=3)
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("GRACE (lower is better)")
    axes.set_title(f"GRACE of {len(names)} candidate teachers for {Path(ranking['student']).name} "
                   f"({ranking['prompts']['scored']} prompts, d = {ranking['settings']['dim']})", fontsize=9)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
