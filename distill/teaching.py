"""What `dyn distill` trains a language-model student on: the objective the training loop
(`distill.trainer.TrainingLoop`) asks for each row's loss, and the two places the teacher's
next-token distribution comes from.

At 0-based optimizer step s (student step t = s + 1, as in `distill/schedules.py`):
  1. the schedule names the teaching checkpoint `teacher_at(t)` (None: labels only) and the KD
     weight w(t);
  2. the student's logits on the batch, cut to the shared vocabulary (`distill/vocabulary.py`);
  3. the teacher at the batch's response tokens: its cached top-k log-probabilities
     (`CachedTeacher`, read by dyn_index) or its full logits from a forward pass (`OnlineTeacher`:
     exact over the whole vocabulary, no top-k);
  4. each row's mean over its response tokens of α·w(t)·KD + (1 − α·w(t))·CE
     (`distill.losses.distillation_loss`), which the loop averages over the step's rows exactly
     as `dyn train` averages its per-row cross-entropy.
No teacher is read or run at a step whose KD weight is 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class DistillObjective:
    """Per-row distillation losses for the training loop (see the module doc)."""

    def __init__(self, schedule, teacher, settings, shared):
        self.schedule, self.teacher, self.settings, self.shared = schedule, teacher, settings, shared

    def weights_at(self, step: int) -> tuple:
        """(teaching checkpoint or None, KD weight) at 0-based optimizer step `step`."""
        checkpoint = self.schedule.teacher_at(step + 1)
        weight = self.schedule.kd_weight(step + 1) if checkpoint is not None else 0.0
        return checkpoint, weight

    def row_losses(self, model, batch, positions, step: int):
        from dyn.distill.losses import distillation_loss, next_token_targets
        from dyn.distill.vocabulary import check_label_ids, restrict_logits

        if self.shared is not None:
            check_label_ids(batch["labels"], self.shared)
        checkpoint, weight = self.weights_at(step)
        settings = dataclasses.replace(self.settings, alpha=self.settings.alpha * weight)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # Unshifted logits with shifted targets (`next_token_targets`): the same counted entries as
        # `shift_for_next_token`, without the slice whose backward copies the whole logits gradient.
        student_logits, targets = restrict_logits(logits, self.shared), next_token_targets(batch["labels"])
        teacher = {}
        if settings.alpha > 0:
            teacher = self.teacher.loss_inputs(checkpoint, batch, positions, student_logits.device)
        return distillation_loss(student_logits, targets, settings, **teacher).row_means()

    def log_entry(self, step: int) -> dict:
        checkpoint, weight = self.weights_at(step)
        return {"teacher_step": checkpoint.step if checkpoint is not None else None, "kd_weight": weight}


class CachedTeacher:
    """The teacher's top-k from a `dyn distill cache` folder, read for the batch's rows by their
    dyn_index (`dyn_index[position]` for each example position)."""

    kind = "cache"

    def __init__(self, cache, dyn_index: np.ndarray, shared, row_names):
        self.cache, self.dyn_index, self.shared, self.row_names = cache, np.asarray(dyn_index), shared, row_names

    def loss_inputs(self, checkpoint, batch, positions, device) -> dict:
        from dyn.distill.vocabulary import restrict_top_k

        top = self.cache.read(checkpoint.step, self.dyn_index[np.asarray(positions)])
        top = restrict_top_k(top, self.shared, where=lambda n: self._name_token(positions, n))
        return top.to(device).loss_inputs()

    def _name_token(self, positions, n: int) -> str:
        """The row holding the n-th cached entry of a batch (entries are row-major)."""
        counts = self.cache.response_tokens(self.dyn_index[np.asarray(positions)])
        row = int(np.searchsorted(np.cumsum(counts), n, side="right"))
        return self.row_names([int(positions[row])])

    def describe(self) -> dict:
        return {"teacher": "cache", "cache": str(self.cache.folder), "top_k": self.cache.top_k}


class OnlineTeacher:
    """The teacher run forward on each batch: full logits at the response positions, in eval mode
    without gradients. One checkpoint is held in memory at a time, loaded when the schedule moves
    on (progressive runs load each checkpoint once, in step order)."""

    kind = "online"

    def __init__(self, device, shared, autocast_dtype=None):
        self.device, self.shared, self.autocast_dtype = device, shared, autocast_dtype
        self.model = None
        self.step = None
        self.loads = 0

    def _load(self, checkpoint) -> None:
        from dyn.core.models import load_causal_lm

        self.model = None  # free the previous checkpoint before loading the next
        model = load_causal_lm(str(checkpoint.path), flag="--teacher").to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model, self.step = model, checkpoint.step
        self.loads += 1

    def loss_inputs(self, checkpoint, batch, positions, device) -> dict:
        from contextlib import nullcontext

        import torch

        from dyn.distill.vocabulary import restrict_logits

        if self.step != checkpoint.step:
            self._load(checkpoint)
        device_type = batch["input_ids"].device.type
        autocast = torch.autocast(device_type=device_type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with torch.no_grad(), autocast:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return {"teacher_logits": restrict_logits(logits, self.shared)}  # aligned like the student's (see row_losses)

    def describe(self) -> dict:
        return {"teacher": "online", "checkpoint_loads": self.loads}
