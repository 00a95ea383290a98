"""The reward-hacking monitor at a training run's eval points (docs/hacking.md): the EMA sample grid
turned into an :class:`~miroflow.hacking.EvalPoint` and compared with the previous one."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from miroflow.errors import one_line
from miroflow.hacking import (
    DEFAULT_AGAINST,
    DEFAULT_K,
    EvalPoint,
    Flag,
    HackingInputError,
    figure,
    flag_tags,
    monitor_evals,
    point_from_values,
)
from miroflow.rewards import get_reward, weight_free_rewards
from miroflow.rewards.shapes_judge import judge, parse_caption
from miroflow.tracking import Tracker

__all__ = ["TrainingMonitor"]

log = logging.getLogger(__name__)


def _per_image_rewards(names: Iterable[str], images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    """``{name: [B] normalised score}`` of the weight-free rewards among ``names`` (the ones training
    logs as ``reward/<name>``); ``images`` ``[B, 3, H, W]`` float in [0, 1]."""
    free = set(weight_free_rewards())
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in free:
            r = get_reward(name)
            out[name] = r.normalize(r.score(images, prompts)).detach().double().cpu().numpy()
    return out


def _verdicts(images: torch.Tensor, prompts: list[str]) -> list[bool | None]:
    """Shapes-judge ``correct`` per image (``None`` for a prompt the judge cannot parse)."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [bool(judge(img, p).correct) if parse_caption(p).parsed else None for img, p in zip(arr, prompts)]


class TrainingMonitor:
    """The monitor at a training run's eval points: each call of :meth:`observe` turns the EMA sample
    grid (``train.sample_prompts``, one image each) into an :class:`EvalPoint` (per-image rewards and,
    on the shapes domain, the judge's verdicts pooled over the images) and compares it with the
    previous eval point.

    The grid is small (4 images by default), so its standard errors are wide: only large moves are
    flagged. Logged to ``tracker``: metric ``hacking/flags`` (flags of the interval ending at that
    step), the tags of :func:`flag_tags` (cumulative over this process; a resumed run starts again)
    and ``plots/hacking.png`` whenever a flag is raised and at :meth:`finish`. A point the monitor
    cannot use is logged as a warning and tag ``hacking.error``, never failing the training.
    """

    def __init__(
        self,
        tracker: Tracker,
        reward_names: Sequence[str],
        judged: bool,
        k: float = DEFAULT_K,
        against: Sequence[str] | None = DEFAULT_AGAINST,
    ) -> None:
        self.tracker = tracker
        self.reward_names = list(reward_names)
        self.judged = judged
        self.k = k
        self.against = against
        self.points: list[EvalPoint] = []
        self.flags: list[Flag] = []

    def observe(self, step: int, images: torch.Tensor, prompts: list[str]) -> list[Flag]:
        """Add the eval point at ``step`` (``images`` ``[P, 3, H, W]`` in [0, 1], ``prompts`` P captions);
        returns its new flags."""
        try:
            verdicts = _verdicts(images, prompts) if self.judged else None
            if verdicts is not None and all(v is None for v in verdicts):
                verdicts = None  # no sample prompt the judge parses: rewards only
            vals = _per_image_rewards(self.reward_names, images, prompts)
            point = point_from_values(f"step {step}", float(step), vals, verdicts)
            new = monitor_evals([self.points[-1], point], self.k, against=self.against) if self.points else []
        except HackingInputError as err:
            log.warning("hacking monitor at step %d: %s", step, err)
            self.tracker.set_tags({"hacking.error": one_line(err)})
            return []
        self.points.append(point)
        if len(self.points) < 2:
            return []
        self.flags.extend(new)
        self.tracker.log_metrics({"hacking/flags": float(len(new))}, step)
        self.tracker.set_tags(flag_tags(self.flags))
        for f in new:
            log.warning("reward hacking? %s", f.text())
        if new:
            self._log_figure()
        return new

    def finish(self) -> None:
        """Log the plot of every eval point so far (nothing with fewer than two)."""
        if len(self.points) >= 2:
            self._log_figure()
            self.tracker.log_dict({"k": self.k, "flags": [f.to_dict() for f in self.flags]}, "hacking/flags.json")

    def _log_figure(self) -> None:
        fig = figure([(self.points, self.flags, "training eval points (EMA sample grid)", "step")], k=self.k)
        self.tracker.log_figure(fig, "plots/hacking.png")
