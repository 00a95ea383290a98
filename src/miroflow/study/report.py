"""The study's numbers turned into a report: speed-ups, the five claims, the budget line,
figures, ``results.md`` and its notes. Pure functions of the study dict (no training, no storage)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from miroflow import plots
from miroflow.study.config import JUDGE_SELECT_BY

__all__ = [
    "CATEGORIES",
    "speedup",
    "speedups",
    "tts_claims",
    "budget_line",
    "judge_claims",
    "write_figures",
    "markdown",
    "notes",
    "fmt",
    "mean",
    "schedule_verdict",
    "floor_text",
    "hacking_lines",
]

#: Display order of the judge categories (GenEval's six).
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def mean(vals: Sequence[float | None]) -> float | None:
    """Mean of the finite values (``None`` when there are none)."""
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def fmt(v: Any, nd: int = 3) -> str:
    """``v`` with ``nd`` decimals; ``–`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.{nd}f}"


# --------------------------------------------------------------------------- speed-up, claims
def speedup(steps: Sequence[int], miro: Sequence[float | None], target: float | None) -> dict[str, Any]:
    """Steps MIRO needs to reach ``target`` (the baseline's final value) on its eval curve.

    Returns ``{"reached_at", "final", "speedup", "lower_bound", "text"}``: ``speedup = final /
    reached_at``; when MIRO is already there at the first eval point it is only a lower bound
    (``"≥ x"``); ``None`` when MIRO never reaches it.
    """
    final = int(steps[-1])
    out: dict[str, Any] = {
        "reached_at": None,
        "final": final,
        "speedup": None,
        "lower_bound": False,
        "text": "not reached",
    }
    if target is None:
        out["text"] = "n/a"
        return out
    for k, (s, v) in enumerate(zip(steps, miro)):
        if v is not None and math.isfinite(v) and v >= target:
            out.update(reached_at=int(s), speedup=final / int(s), lower_bound=k == 0)
            out["text"] = f"≥ {final / int(s):.1f}×" if k == 0 else f"{final / int(s):.1f}×"
            break
    return out


def speedups(
    curves: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]], rewards: Sequence[str]
) -> tuple[list[int], dict[str, Any]]:
    """The eval steps and, per metric (``overall`` and every reward), MIRO's speed-up over the baseline
    (group means of the curves) against the baseline's final and its best point."""

    def group_curve(role: str, key: str) -> list[float | None]:
        cs = [curves[n]["metrics"].get(key, []) for n in groups.get(role, [])]
        return [mean([c[k] for c in cs]) for k in range(min(len(c) for c in cs))] if cs else []

    steps = list(curves[groups["miro"][0]]["steps"])
    out: dict[str, Any] = {}
    for r in ["overall", *rewards]:
        bc, mc = group_curve("baseline", r), group_curve("miro", r)
        target = bc[-1] if bc else None
        best = max((v for v in bc if v is not None and math.isfinite(v)), default=None)
        strict = speedup(steps[: len(mc)], mc, best)  # vs the baseline's BEST point: robust to a declining baseline
        out[r] = {
            **speedup(steps[: len(mc)], mc, target),
            "target": target,
            "miro_curve": mc,
            "baseline_curve": bc,
            "baseline_best": best,
            "strict_text": strict["text"],
            "strict_speedup": strict["speedup"],
        }
    return steps, out


def tts_claims(tts: Mapping[str, Any], rewards: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per reward: MIRO's single sample and the baseline's best-of-8 (``None`` without N=8)."""
    out: dict[str, dict[str, float | None]] = {}
    for r in rewards:
        m, b = tts["miro"]["select_by"][r], tts["baseline"]["select_by"][r]
        b8 = b["curves"][r][b["ns"].index(8)] if 8 in b["ns"] else None
        out[r] = {"miro_n1": m["curves"][r][0], "baseline_best_of_8": b8}
    return out


def budget_line(first_full_min: float | None, budget_min: float) -> str:
    """Report line: did the first (from-scratch) invocation fit the size's wall-time budget (minutes)?

    ``first_full_min`` is ``None`` when no invocation that started from scratch has finished (the
    first one stopped before writing its numbers): the budget was then not measured.
    """
    if first_full_min is None:
        return (
            f"- Budget: no invocation of this size that started from scratch has finished (this one resumed "
            f"earlier work), so the budget of {budget_min:g} min on a 2-core machine was **not measured**."
        )
    met = first_full_min <= budget_min
    return (
        f"- Budget: the first (from-scratch) invocation took {first_full_min:.1f} min against a budget of "
        f"{budget_min:g} min for this size on a 2-core machine: **{'met' if met else 'NOT met'}**."
    )


def _claim_margins(
    final: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]], rewards: Sequence[str]
) -> dict[str, Any]:
    base = [final[r] for r in groups["baseline"]]
    miro = [final[r] for r in groups["miro"]]
    rows, ok = [], True
    for m in ["overall", *rewards]:
        b = [x[m] for x in base if x.get(m) is not None]
        mm = [x[m] for x in miro if x.get(m) is not None]
        if not b or not mm:
            ok = False
            continue
        margin = float(np.mean(mm) - np.mean(b))
        spread = max(float(np.ptp(b)) if len(b) > 1 else 0.0, float(np.ptp(mm)) if len(mm) > 1 else 0.0)
        good = margin > 0 and margin > spread
        ok &= good
        rows.append(
            f"{m}: MIRO {np.mean(mm):.3f} vs baseline {np.mean(b):.3f} (margin {margin:+.3f}, "
            f"seed spread {spread:.3f}) {'✓' if good else '✗'}"
        )
    return {
        "claim": "MIRO beats the baseline on overall judge accuracy and on every reward at the final step, by "
        "more than the spread between two seeds",
        "reproduced": ok,
        "evidence": rows,
    }


def _claim_target(tgt: Mapping[str, Any]) -> dict[str, Any]:
    ys, ses = tgt["values"], tgt["se"]
    viol = [
        k
        for k in range(1, len(ys))
        if ys[k] is None or ys[k - 1] is None or ys[k] < ys[k - 1] - 2 * max(ses[k] or 0, ses[k - 1] or 0)
    ]
    rise = ys[-1] is not None and ys[0] is not None and ys[-1] > ys[0] + 2 * max(ses[0] or 0, ses[-1] or 0)
    points = ", ".join(f"target {x:g}: {fmt(y)} ± {fmt(s)}" for x, y, s in zip(tgt["targets"], ys, ses))
    return {
        "claim": f"Moving the {tgt['reward']} target from 0 to 1 raises {tgt['reward']} monotonically within noise",
        "reproduced": not viol and rise,
        "evidence": [
            points,
            f"steps that fall by more than 2 SE: {[tgt['targets'][k] for k in viol] or 'none'}; "
            f"total rise {fmt((ys[-1] or 0) - (ys[0] or 0))}",
        ],
    }


def judge_claims(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The five acceptance claims, each ``{"claim", "reproduced", "evidence"}``, from the study numbers."""
    rewards: list[str] = study["rewards"]
    final = study["final"]
    groups = study["groups"]
    # 1. MIRO beats the baseline at the final step on overall accuracy and every reward, margin > seed spread
    claims: list[dict[str, Any]] = [_claim_margins(final, groups, rewards)]

    # 2. convergence speed-up >= 3x on at least two rewards
    sp = study["speedup"]
    fast = [r for r in rewards if sp.get(r, {}).get("speedup") is not None and sp[r]["speedup"] >= 3.0]
    claims.append(
        {
            "claim": "Convergence speed-up ≥ 3× on at least two rewards",
            "reproduced": len(fast) >= 2,
            "evidence": [
                f"{r}: {sp[r]['text']} (baseline final {fmt(sp[r].get('target'))}; MIRO reaches it "
                + (f"at step {sp[r]['reached_at']} of {sp[r]['final']})" if sp[r]["reached_at"] else "at no eval step)")
                for r in rewards
                if r in sp
            ],
        }
    )

    # 3. MIRO N=1 >= baseline best-of-8 on at least two rewards
    tts = study.get("tts") or {}
    rows, wins = [], []
    for r in rewards:
        t = tts.get(r)
        if not t:
            continue
        m1, b8 = t["miro_n1"], t["baseline_best_of_8"]
        good = m1 is not None and b8 is not None and m1 >= b8
        if good:
            wins.append(r)
        rows.append(f"{r}: MIRO N=1 {fmt(m1)} vs baseline best-of-8 {fmt(b8)} {'✓' if good else '✗'}")
    claims.append(
        {
            "claim": "MIRO with one sample is at least as good as the baseline's best-of-8 on at least two rewards",
            "reproduced": len(wins) >= 2,
            "evidence": rows,
        }
    )

    # 4. target sweep monotone within noise
    if study.get("target_sweep"):
        claims.append(_claim_target(study["target_sweep"]))
    # 5. synthetic captions beat real captions on judge accuracy
    syn = [final[r]["overall"] for r in groups.get("synthetic", []) if final[r].get("overall") is not None]
    real = [final[r]["overall"] for r in groups["miro"] if final[r].get("overall") is not None]
    if syn and real:
        claims.append(
            {
                "claim": "Synthetic-caption MIRO beats real-caption MIRO on judge accuracy",
                "reproduced": float(np.mean(syn)) > float(np.mean(real)),
                "evidence": [
                    f"overall accuracy: synthetic-caption MIRO {np.mean(syn):.3f} vs real-caption "
                    f"MIRO {np.mean(real):.3f} (seeds {len(real)})"
                ],
            }
        )
    return claims


# --------------------------------------------------------------------------- figures
def write_figures(
    study: Mapping[str, Any], samples: tuple[np.ndarray, list[str], list[str]], fig_dir: Path
) -> dict[str, Path]:
    """The report's figures as PNG files under ``fig_dir``: ``{key: path}`` (convergence, tts,
    target, guidance, samples)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    dpi = 72
    rewards = study["rewards"]
    figs = {
        "convergence": plots.save_png(
            plots.convergence(study["curves"], ["overall", *rewards]), fig_dir / "convergence.png", dpi=dpi
        )
    }
    if study.get("tts_raw"):
        fig = plots.best_of_n_panels(study["tts_raw"], rewards, judge_select_by=JUDGE_SELECT_BY)
        figs["tts"] = plots.save_png(fig, fig_dir / "best_of_n.png", dpi=dpi)
    sw = study.get("sweeps") or {}
    omega = f"{study['guidance_scale']:g}"
    for kind, file, xlabel, title in (
        (
            "target",
            "target_sweep.png",
            f"target {study['target_reward']} (others 1)",
            f"reward-target sweep ({sw.get('run')}, ω={omega})",
        ),
        ("guidance", "guidance_sweep.png", "guidance ω", f"guidance sweep ({sw.get('run')}, targets 1 vs 0)"),
    ):
        if sw.get(kind):
            series = {k: [p.get(k) for p in sw[kind]] for k in [*rewards, "overall"]}
            fig = plots.tradeoff([p["x"] for p in sw[kind]], series, xlabel=xlabel, title=title)
            figs[kind] = plots.save_png(fig, fig_dir / file, dpi=dpi)
    imgs, labels, prompts = samples
    fig = plots.image_grid(
        imgs,
        row_labels=labels,
        col_labels=[p if len(p) <= 22 else p[:20] + "…" for p in prompts],
        title="final samples (first image per prompt, same seeds)",
    )
    figs["samples"] = plots.save_png(fig, fig_dir / "samples.png", dpi=48)
    return figs


# --------------------------------------------------------------------------- guidance schedules, floor, hacking
#: Share of full guidance's mean reward gain a schedule must keep (issue 14, item 6).
KEEP_GAIN = 0.9


def _mean_reward(pt: Mapping[str, Any], rewards: Sequence[str]) -> float | None:
    vals = [float(v) for v in (pt.get(r) for r in rewards) if v is not None]
    return float(np.mean(vals)) if vals else None


def schedule_verdict(schedules: Mapping[str, Any] | None, rewards: Sequence[str]) -> dict[str, Any]:
    """Does some guidance schedule keep ≥ 90 % of full guidance's mean reward gain with the judge within noise?

    Reference ``ref`` = the constant point with ω = 0; ``full`` = the constant point with the largest
    ω > 0. For every other point at ``full``'s ω: ``kept = (R̄(s) − R̄(ref)) / (R̄(full) − R̄(ref))``
    with ``R̄`` the mean over the image rewards (``rewards`` without ``shapes_alignment``, the judge's own
    score, which the accuracy condition covers) of the reward means, and ``Δacc = acc(s) − acc(ref)`` against
    ``2·SE``, ``SE = sqrt(SE_s² + SE_ref²)`` (binomial judge SEs). A point qualifies when ``kept ≥ 0.9``
    and ``Δacc ≥ −2·SE`` (not lower than ω = 0 beyond noise; a higher accuracy also qualifies).

    Returns:
        ``{"answer": "yes" | "no" | "n/a", "sentence", "rows": [{name, kept, d_acc, se, gain_ok, acc_ok}],
        "full", "ref"}``.
    """
    pts = list((schedules or {}).get("points") or [])
    rewards = [r for r in rewards if r != JUDGE_SELECT_BY] or list(rewards)
    ref = next((p for p in pts if p["schedule"] == "constant" and p["omega"] == 0), None)
    fulls = [p for p in pts if p["schedule"] == "constant" and p["omega"] > 0]
    full = max(fulls, key=lambda p: p["omega"]) if fulls else None
    if ref is None or full is None:
        return {
            "answer": "n/a",
            "sentence": "The schedule question needs a constant ω = 0 point and a constant ω > 0 point; "
            "study.guidance_schedules lacks one.",
            "rows": [],
            "ref": None,
            "full": None,
        }
    r0, r1 = _mean_reward(ref, rewards), _mean_reward(full, rewards)
    a0, se0 = ref.get("overall"), ref.get("judge_se") or 0.0
    rows: list[dict[str, Any]] = []
    for p in pts:
        if p is ref or p["omega"] != full["omega"]:
            continue
        rs, acc = _mean_reward(p, rewards), p.get("overall")
        gain_full = None if r0 is None or r1 is None else r1 - r0
        kept = None if gain_full is None or rs is None or gain_full <= 0 else (rs - r0) / gain_full  # type: ignore[operator]
        se = math.hypot(p.get("judge_se") or 0.0, se0)
        d_acc = None if acc is None or a0 is None else acc - a0
        rows.append(
            {
                "name": p["name"],
                "kept": kept,
                "d_acc": d_acc,
                "se": se,
                "gain_ok": kept is not None and kept >= KEEP_GAIN,
                "acc_ok": d_acc is not None and d_acc >= -2 * se,
                "candidate": p is not full,
            }
        )
    gain_full = None if r0 is None or r1 is None else r1 - r0
    w = f"{full['omega']:g}"
    if gain_full is None or gain_full <= 0:
        return {
            "answer": "n/a",
            "sentence": f"Constant ω = {w} gives no mean reward gain over ω = 0 (R̄ {fmt(r0)} → {fmt(r1)}), so there "
            "is no gain to keep: the question does not apply to this run.",
            "rows": rows,
            "ref": ref["name"],
            "full": full["name"],
        }
    good = [r for r in rows if r["candidate"] and r["gain_ok"] and r["acc_ok"]]
    detail = "; ".join(
        f"{r['name']}: keeps {fmt(r['kept'], 3)} of the gain, accuracy {fmt(r['d_acc'], 3)} vs ω = 0 (2 SE = "
        f"{fmt(2 * r['se'], 3)})"
        for r in rows
    )
    head = (
        f"Does some schedule keep ≥ {KEEP_GAIN:.0%} of constant ω = {w}'s mean reward gain over ω = 0 (mean over "
        f"{', '.join(rewards)}: {fmt(r0)} → {fmt(r1)}, gain {gain_full:+.4f}) with judge accuracy not below ω = 0's "
        f"({fmt(a0)}) by more than 2 SE? "
    )
    answer = "yes" if good else "no"
    verdict = (
        f"**Yes**: {', '.join(r['name'] for r in good)}." if good else "**No**: no schedule meets both conditions."
    )
    return {
        "answer": answer,
        "sentence": f"{head}{verdict} Per point: {detail}.",
        "rows": rows,
        "ref": ref["name"],
        "full": full["name"],
    }


def floor_text(study: Mapping[str, Any]) -> str:
    """One line: the judge floor (max over object-free input kinds), overall and per category, or ``n/a``."""
    fl = study.get("judge_floor") or {}
    worst = fl.get("max") or {}
    if fl.get("error") or "overall" not in worst:
        why = fl.get("error") or "not computed"
        return f"Judge floor: n/a ({why})."
    cats = ", ".join(f"{k} {fmt(worst[k], 2)}" for k in CATEGORIES if k in worst)
    kinds = ", ".join(f"{k} {fmt(v.get('overall'), 3)}" for k, v in (fl.get("kinds") or {}).items())
    return (
        f"Judge floor (accuracy the judge gives object-free images at {fl.get('resolution')} px, max over input "
        f"kinds): overall **{fmt(worst['overall'])}**; per category {cats}; overall per kind: {kinds}. An accuracy "
        "means something only above its floor."
    )


def _schedules_md(study: Mapping[str, Any]) -> list[str]:
    sc, rewards = study["schedules"], study["rewards"]
    L = [
        "## Guidance schedules\n",
        f"On `{sc['run']}`, {study['sweep_set'].split(', ω')[0]}; flow time t runs from 1 (noise) to 0 (data). "
        "`interval [a, b]` = ω only while a ≤ t ≤ b (positive branch alone elsewhere); `damped` = ω·f(t) with "
        "f(t) = t (linear) or (1 − cos πt)/2 (cosine). Judge accuracy ± its binomial SE; reward means.\n",
        "| point | ω | schedule | judge accuracy ± SE | " + " | ".join(rewards) + " | mean image reward |",
        "|---" * (5 + len(rewards)) + "|",
    ]
    for p in sc["points"]:
        how = p["schedule"]
        if how == "interval":
            how += f" [{p['interval'][0]:g}, {p['interval'][1]:g}]"
        elif how == "damped":
            how += f" ({p['decay']})"
        L.append(
            f"| {p['name']} | {p['omega']:g} | {how} | {fmt(p.get('overall'))} ± {fmt(p.get('judge_se'))} | "
            + " | ".join(fmt(p.get(r)) for r in rewards)
            + f" | {fmt(_mean_reward(p, [r for r in rewards if r != JUDGE_SELECT_BY]))} |"
        )
    L.append("")
    v = study.get("schedule_verdict") or {}
    if v.get("sentence"):
        L.append(v["sentence"] + "\n")
    L.append(floor_text(study) + "\n")
    return L


def hacking_lines(study: Mapping[str, Any]) -> list[str]:
    """Every reward-hacking flag of the study (convergence curves and sweep grids), one line each."""
    hk = study.get("hacking") or {}
    groups = [(f"run `{n}` (convergence, by step)", d) for n, d in (hk.get("curves") or {}).items()]
    groups += [(f"{kind} sweep (by x)", d) for kind, d in (hk.get("sweeps") or {}).items()]
    groups += [(f"best-of-N of {label} (by N)", d) for label, d in (hk.get("best_of_n") or {}).items()]
    out: list[str] = []
    for label, d in groups:
        if d.get("error"):
            out.append(f"{label}: monitor could not run ({d['error']})")
        for f in d.get("flags") or []:
            out.append(
                f"{label}: {f['start']} → {f['end']}: {f['rose']} rose {f['rise']:+.3f} (± {f['rise_se']:.3f}) while "
                f"{f['fell']} fell {f['fall']:+.3f} (± {f['fall_se']:.3f})"
            )
    return out


def _hacking_md(study: Mapping[str, Any]) -> list[str]:
    hk = study.get("hacking") or {}
    lines = hacking_lines(study)
    L = [
        "## Reward-hacking flags\n",
        f"`miroflow.hacking.monitor_evals` (k = {hk.get('k', 2.0):g}): between consecutive evaluations (training "
        "checkpoints by step, sweep points by swept value, best-of-N selections by N), a reward rising by more than "
        f"k SE while {' or '.join(hk.get('against') or ['judge_accuracy'])} falls by more than k SE. Sweep points "
        "and best-of-N candidates share seeds, so the test is conservative there.\n",
    ]
    L += [f"- {x}" for x in lines] if lines else ["- no flags"]
    L.append("")
    return L


# --------------------------------------------------------------------------- results.md
def _claims_md(study: Mapping[str, Any]) -> list[str]:
    """The claims table and their evidence; every claim is judged on samples drawn at guidance
    ω = ``study["guidance_scale"]`` (docs/fidelity.md), shown beside each one."""
    omega = f"{study['guidance_scale']:g}"
    L = ["## Claims\n", "| # | claim | guidance ω | reproduced |\n|---|---|---|---|"]
    for i, cl in enumerate(study["claims"], 1):
        L.append(f"| {i} | {cl['claim']} | {omega} | {'**yes**' if cl['reproduced'] else '**not reproduced**'} |")
    L.append("")
    for i, cl in enumerate(study["claims"], 1):
        L.append(f"{i}. {cl['claim']} (ω = {omega}) — {'reproduced' if cl['reproduced'] else 'not reproduced'}:")
        L.extend(f"   - {e}" for e in cl["evidence"])
    L.append("")
    L.append(floor_text(study) + "\n")
    return L


def ema_md(study: Mapping[str, Any]) -> str:
    """The EMA as it ran: the configured decay, its warm-up and the decay of the last update (a study
    document without ``ema_warmup`` predates the record and gives the configured decay only)."""
    decay, warmup, final = study["ema_decay"], study.get("ema_warmup"), study.get("ema_decay_final")
    if warmup is None:
        return f"EMA {decay}"
    if not warmup:
        return f"EMA decay {decay} from the first step"
    return f"EMA decay min({decay}, (1+t)/(10+t)) ({fmt(final, 4)} at the last step)"


def _setup_md(study: Mapping[str, Any]) -> list[str]:
    rewards, c, d = study["rewards"], study["compute"], study["data"]
    per_run = ", ".join(
        f"{n} {t:.1f} min ({c['train_threads'].get(n) or '?'} thr, {fmt(c['s_per_step'].get(n), 2)} s/step)"
        for n, t in c["train_per_run_min"].items()
    )
    runs = "; ".join(
        f"`{n}` ({r['role']}, rewards {r['rewards']}, synthetic p={r['syn']}, seed {r['seed']})"
        for n, r in study["runs"].items()
    )
    resumed = "started from scratch" if c.get("from_scratch") else "resumed earlier work"
    L = [
        "## Setup and compute\n",
        f"- Data: {d['num_samples']} shapes images at {study['resolution']} px; {d['blurred']} blurred, {d['noisy']} "
        f"noisy, {d['low_contrast']} low-contrast, {d['swapped']} with a swapped (mismatched) caption; every sample "
        f"also has an accurate synthetic caption. Scored with {', '.join(rewards)} ({study['num_bins']} quantile "
        f"bins). Data hash `{d['data_hash']}`.",
        f"- Model: `{study['model']}` denoiser ({study['model_params']:,} parameters for full MIRO), text encoder "
        f"`{study['text_encoder']}`, pixel space, reward embedding `{study.get('reward_features', 'fourier')}`; "
        f"{study['steps']} steps at batch {study['batch_size']}, lr "
        f"{study['lr']}, {ema_md(study)}; reward dropout {study['reward_dropout']} per reward, "
        f"{study['all_reward_dropout']} all rewards.",
        f"- Runs (equal steps, data, schedule): {runs}",
        f"- Evaluation: EMA weights, Euler {study['eval_steps']} steps, all targets 1, "
        f"ω = {study['guidance_scale']:g}, sampling seed {study['eval_seed']}; convergence curves on "
        f"{study['curve_set']} at steps {study['eval_steps_list']}; final table on {study['final_set']}.",
        f"- Machine: {c['cores']} cores, {c['cpu_model']}, torch threads {c['threads']} (load average at start "
        f"{c['load_avg']:.1f}). Wall time: {c['total_min']:.1f} min this invocation ({resumed}), "
        f"{c['cumulative_min']:.1f} min summed over all invocations of this size ({c['invocations']} so far; a "
        f"resumed call reuses finished stages); training {c['train_min']:.1f} min summed over runs (per run: "
        f"{per_run}); stages this invocation: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in c["stages_s"].items())
        + ".",
    ]
    if c.get("budget_min"):
        L.append(budget_line(c["first_full_min"], c["budget_min"]))
    L.append("")
    return L


def _final_md(study: Mapping[str, Any]) -> list[str]:
    rewards = study["rewards"]
    cats = [k for k in CATEGORIES if any(f"acc/{k}" in f for f in study["final"].values())]
    L = [
        "## Final comparison (judge accuracy per GenEval category, overall = mean over categories, mean normalised "
        "rewards)\n",
        "| run | " + " | ".join(cats) + " | **overall** | " + " | ".join(rewards) + " |",
        "|---" * (2 + len(cats) + len(rewards)) + "|",
    ]
    for name, f in study["final"].items():
        L.append(
            f"| {name} | "
            + " | ".join(fmt(f.get(f"acc/{k}"), 2) for k in cats)
            + f" | **{fmt(f.get('overall'))}** | "
            + " | ".join(fmt(f.get(r)) for r in rewards)
            + " |"
        )
    worst = (study.get("judge_floor") or {}).get("max") or {}
    if "overall" in worst:
        L.append(
            "| *judge floor (object-free images, max over kinds)* | "
            + " | ".join(fmt(worst.get(k), 2) for k in cats)
            + f" | *{fmt(worst['overall'])}* | "
            + " | ".join("–" for _ in rewards)
            + " |"
        )
    L.append("")
    L.append(floor_text(study) + "\n")
    return L


def _convergence_md(study: Mapping[str, Any], figs: Mapping[str, Path]) -> list[str]:
    L = [
        "## Convergence and speed-up\n",
        "Speed-up per reward = final step / first eval step at which MIRO (mean of its seeds) reaches the baseline's "
        'final value (mean of its seeds), on the convergence curves (the paper\'s definition); "≥" = MIRO was '
        "already there at the first eval point.\n",
        "The last two columns repeat the measurement against the baseline's *best* point on its curve instead of its "
        "final one (stricter where the baseline's curve falls during training); the claim uses the paper's "
        "definition.\n",
        "| reward | baseline curve | MIRO curve (mean of seeds) | reached at | speed-up | baseline best | "
        "speed-up vs best |\n|---|---|---|---|---|---|---|",
    ]
    for r in ["overall", *study["rewards"]]:
        s = study["speedup"].get(r)
        if s:
            L.append(
                f"| {r} | {' / '.join(fmt(v) for v in s['baseline_curve'])} | "
                f"{' / '.join(fmt(v) for v in s['miro_curve'])} | {s['reached_at'] or '–'} | {s['text']} | "
                f"{fmt(s.get('baseline_best'))} | {s.get('strict_text', '–')} |"
            )
    L.append("")
    if "convergence" in figs:
        L.append(f"![convergence](figures/{figs['convergence'].name})\n")
    return L


def _tts_md(study: Mapping[str, Any], figs: Mapping[str, Path]) -> list[str]:
    rewards, raw = study["rewards"], study["tts_raw"]
    L = [
        "## Test-time scaling: best-of-N\n",
        f"{study['tts_set']}; candidates scored by every reward; for each reward the best of the first N candidates "
        "by that reward. Compute per image = N × steps denoiser evaluations + N reward calls.\n",
    ]
    ns = raw["miro"]["select_by"][rewards[0]]["ns"]
    L.append(
        "| reward (selected by itself) | MIRO N=1 | "
        + " | ".join(f"baseline N={n}" for n in ns)
        + " | "
        + " | ".join(f"MIRO N={n}" for n in ns[1:])
        + " |"
    )
    L.append("|---" * (2 + 2 * len(ns) - 1) + "|")
    for r in [*rewards, "accuracy"]:
        sel = JUDGE_SELECT_BY if r == "accuracy" else r
        m = raw["miro"]["select_by"][sel]["curves"][r]
        b = raw["baseline"]["select_by"][sel]["curves"][r]
        label = r if r != "accuracy" else f"judge accuracy (selected by {JUDGE_SELECT_BY})"
        L.append(
            f"| {label} | {fmt(m[0])} | "
            + " | ".join(fmt(v) for v in b)
            + " | "
            + " | ".join(fmt(v) for v in m[1:])
            + " |"
        )
    L.append("")
    if "tts" in figs:
        L.append(f"![best-of-N](figures/{figs['tts'].name})\n")
    return L


def _sweeps_md(study: Mapping[str, Any], figs: Mapping[str, Path]) -> list[str]:
    rewards, sw = study["rewards"], study["sweeps"]
    head = " | ".join(rewards) + " | overall |\n" + "|---" * (len(rewards) + 2) + "|"
    L = [
        "## Reward-target and guidance sweeps\n",
        f"On `{sw['run']}`, {study['sweep_set']}.\n",
        f"| target {study['target_reward']} | " + head,
    ]
    for kind, first in (("target", None), ("guidance", "| ω | " + head)):
        if first:
            L.append(first)
        for p in sw[kind]:
            L.append(f"| {p['x']:g} | " + " | ".join(fmt(p.get(r)) for r in rewards) + f" | {fmt(p.get('overall'))} |")
        L.append("")
    for k in ("target", "guidance"):
        if k in figs:
            L.append(f"![{k} sweep](figures/{figs[k].name})\n")
    return L


def markdown(study: Mapping[str, Any], figs: Mapping[str, Path]) -> str:
    """``results.md`` of the study dict, with links to ``figs``."""
    L = [
        f"# MIRO vs baseline on the shapes domain ({study['size']} size)\n",
        f"Regenerated by `{study['command']}` (`miroflow.study.run_study`); do not edit by hand. "
        f"Generated {study['generated']}. Settings: `params.yaml` + `study.yaml` (size `{study['size']}`).\n",
    ]
    if study["size"] != "default":
        L.append(
            "> **Quick size: a smoke test of the mechanics. These numbers are NOT evidence for or against any "
            "claim.**\n"
        )
    L += _claims_md(study) + _setup_md(study) + _final_md(study) + _convergence_md(study, figs)
    if study.get("tts"):
        L += _tts_md(study, figs)
    if study.get("sweeps"):
        L += _sweeps_md(study, figs)
    if study.get("schedules"):
        L += _schedules_md(study)
    L += _hacking_md(study)
    if "samples" in figs:
        L += ["## Samples\n", f"![samples](figures/{figs['samples'].name})\n"]
    L.append("## Notes\n")
    L.extend(f"- {n}" for n in study.get("notes", []))
    L.append("")
    return "\n".join(L)


def notes(study: Mapping[str, Any]) -> list[str]:
    """The report's standing notes (noise level, nothing tuned, where the artifacts are, failed claims)."""
    out = [
        "Numbers are means over the evaluation images; with this many images a judge accuracy has a standard error of "
        "about ±0.03–0.05, a reward mean about ±0.01–0.02 (see each eval's summary.json for stds).",
        "Nothing in the evaluation was tuned to make a claim hold: ω, targets, prompts and seeds are fixed in "
        "study.yaml before the run.",
        "Artifacts (checkpoints every eval interval, eval images in GenEval layout, summaries, best-of-N candidates' "
        f"scores) are under `{study['root']}`; MLflow experiment `{study['experiment']}`, parent run "
        f"`{study.get('mlflow_run_id')}`.",
    ]
    if any(not c["reproduced"] for c in study["claims"]):
        out.append(
            "Claims not reproduced are left so; what was tried is the single configuration of study.yaml (tiny "
            f"3-layer width-64 MMDiT, {study['steps']} steps at batch {study['batch_size']}, reward dropout "
            f"{study['reward_dropout']}/{study['all_reward_dropout']}, ω = {study['guidance_scale']:g} "
            "with an ω sweep); the analysis of why follows."
        )
    return out
