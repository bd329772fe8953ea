"""`report.md`: the fitted laws of a sweep in a form that can go into a paper's appendix.

Per family: the chosen form and why, parameters with bootstrap CIs (3+ significant figures), the
held-out extrapolation errors, local slopes and flags, the compute multiplier vs the reference
family, the points themselves, and a checklist of every fitting choice (form, loss, optimizer,
starts, bootstrap) so the fit can be reproduced and criticised.
"""

from __future__ import annotations

import math

from analysis.forms import FORMS, get_form
from analysis.scaling_fit import AXES, FamilyFit, SweepFit


def sig(value: float | None, digits: int = 4) -> str:
    """`digits` significant figures, or n/a for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _family_section(fam: FamilyFit, fit: SweepFit) -> list[str]:
    lines = [f"## {fam.family}", ""]
    chosen = fam.chosen
    if chosen is None:
        lines += [f"No usable fit: {fam.choice.reason}.", ""]
    else:
        form = get_form(chosen.form)
        lines += [f"**Chosen form:** `{form.equation}` ({fam.choice.reason}).", ""]
        lines += ["| parameter | estimate | bootstrap SE | 80% CI | 95% CI |", "|---|---|---|---|---|"]
        boot = fam.bootstrap
        for name in form.param_names:
            ci = boot.params[name] if boot else None
            lines.append(f"| {name} | {sig(chosen.params[name])} | {sig(ci.se) if ci else 'n/a'} | "
                         f"[{sig(ci.p10)}, {sig(ci.p90)}] | [{sig(ci.p2_5)}, {sig(ci.p97_5)}] |" if ci else
                         f"| {name} | {sig(chosen.params[name])} | n/a | n/a | n/a |")
        if boot:
            seed_note = (f"seed noise σ = {sig(boot.sigma_seed, 3)} (pooled over sizes with >= 2 seeds)"
                         if math.isfinite(boot.sigma_seed) else "no size has 2+ seeds, so the CIs cannot include seed noise")
            lines += ["", f"Bootstrap: {boot.n_resamples} resamples over {boot.n_runs} runs in {boot.n_groups} sizes, "
                          f"{boot.n_failed} failed fits; {seed_note}; {boot.n_parametric_groups} single-run size(s) "
                          "resampled parametrically."]
        lines += ["", f"Improvement across the sweep: {sig(fam.improvement, 4)} ({fit.fitted_quantity}, smallest to largest size)."]
    lines += ["", "**Held-out extrapolation** (refit without the largest k sizes):", "",
              "| form | k | size | observed | predicted | error | relative | share of gain | in 80% band |",
              "|---|---|---|---|---|---|---|---|---|"]
    sizes = {p: pt.size for p, pt in zip(fam.x.tolist(), fam.points)}
    holdouts = [(fam.choice.chosen, h) for h in fam.holdouts]
    holdouts += [(name, h) for name, hs in fam.holdouts_other_forms.items() for h in hs]
    for name, h in holdouts:
        for p in h.points:
            band = "n/a" if p.in_band is None else ("yes" if p.in_band else "no")
            usable = "" if h.fit.ok else " (fit not ok)"
            lines.append(f"| {name}{usable} | {h.k} | {sizes.get(p.x, sig(p.x))} | {sig(p.observed, 5)} | "
                         f"{sig(p.predicted, 5)} | {p.error:+.3g} | {p.rel_error:+.3%} | {_pct(p.share_of_gain)} | {band} |")
    other = [f"{n}: held-out |err| {sig(fam.choice.held_out_mae.get(n, float('nan')), 3)}, AIC {sig(fam.choice.aic.get(n, float('nan')), 4)}"
             for n in FORMS if n in fam.fits]
    lines += ["", "Forms compared: " + "; ".join(other) + "."]
    if fam.choice.excluded:
        lines += ["Excluded: " + "; ".join(f"{n} ({why})" for n, why in fam.choice.excluded.items()) + "."]
    if fam.slopes is not None:
        s = fam.slopes
        parts = [f"{sig(lo, 3)}→{sig(hi, 3)}: {sig(v, 3)} [{sig(a, 3)}, {sig(b, 3)}]"
                 for lo, hi, v, a, b in zip(s.x_lo, s.x_hi, s.slope, s.ci_lo, s.ci_hi)]
        lines += ["", f"**Local slopes** d{fit.fitted_quantity}/d ln x ({s.level:.0%} CI): " + "; ".join(parts) + ".",
                  f"Plateau: {'yes' if s.plateau else 'no'} ({s.reason})."]
    if fam.flags:
        lines += ["", "**Flags:**", ""] + [f"- {flag}" for flag in fam.flags]
    lines += ["", "**Points** (after learning-rate selection on the validation half):", "",
              "| size | GFLOP/example | train FLOPs | params dense | params emb | seeds | mean | s.e. | chosen lr (mean valid, tried) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in fam.points:
        lr = ""
        if p.choice is not None:
            chosen_vals = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for _, v in p.choice.values)
            tried = "; ".join(f"{', '.join(f'{v:.3g}' if isinstance(v, float) else str(v) for _, v in vals)}: {m:.5f}"
                              for vals, m in p.choice.tried)
            lr = f"{chosen_vals} ({tried}){' **edge**' if p.choice.on_edge else ''}"
        lines.append(f"| {p.size} | {p.gflops_per_example:.4g} | {p.train_flops:.3g} | {p.params_dense:,} | "
                     f"{p.params_embedding:,} | {p.n} | {p.mean:.5f} | {sig(p.sem, 3)} | {lr} |")
    return lines + [""]


def other_axis_params(fam: FamilyFit) -> dict[str, float] | None:
    """The chosen fit's parameters on the total-train-FLOPs axis (or back), converted exactly.

    The 1-D fits use one data size per family, so train FLOPs = c x forward FLOPs with c = 3 x 1e9 x
    examples: a power law keeps its exponent (A becomes A c^alpha), a log-linear law its slope
    (a becomes a - b ln c).
    """
    fit = fam.chosen
    if fit is None or not fam.points:
        return None
    p0 = fam.points[0]
    c = p0.train_flops / p0.gflops_per_example  # same for every point of the family
    if fam.x[0] == p0.train_flops:  # fitted on train FLOPs: convert back to GFLOP/example
        c = 1.0 / c
    params = dict(fit.params)
    if fit.form in ("saturating", "power"):
        params["A"] = params["A"] * c ** params["alpha"]
    else:
        params["a"] = params["a"] - params["b"] * math.log(c)
    return params


def _other_axis_table(fit: SweepFit) -> list[str]:
    other = "train_flops" if fit.axis == "gflops_per_example" else "gflops_per_example"
    lines = [f"**The same laws vs {AXES[other]}** (each family's runs share one number of examples, so the axes "
             "differ by a constant factor: exponents, slopes and CIs are unchanged, the other parameters convert exactly):",
             "", "| family | form | parameters |", "|---|---|---|"]
    for name, fam in sorted(fit.families.items()):
        params = other_axis_params(fam)
        text = ", ".join(f"{k} = {sig(v)}" for k, v in params.items()) if params else "n/a"
        lines.append(f"| {name} | {fam.choice.chosen or 'none'} | {text} |")
    return lines + [""]


def render_report(fit: SweepFit, command: str) -> str:
    """The markdown text of report.md."""
    lines = [f"# Scaling fits: {fit.source}", "",
             f"Quality: test {fit.metric} (fitted as {fit.fitted_quantity}) vs {AXES[fit.axis]}, "
             f"{fit.n_runs} finished runs. Reproduce with:", "", f"    {command}", ""]
    if fit.floor is not None and fit.fitted_quantity.startswith("1 - "):
        lines += [f"Oracle {fit.metric} on the test items: {fit.floor:.5f} (ranking by the true next-item "
                  "probabilities of the synthetic process; the ceiling).", ""]
    elif fit.floor is not None:
        lines += [f"Bayes-optimal {fit.metric} on the test half: {fit.floor:.5f} (the data is synthetic; no model can beat it).", ""]
    lines += ["| family | form | exponent / slope [80% CI] | held-out error (k=1), share of gain | "
              f"compute multiplier vs {fit.reference_family} [80% CI] | sizes | runs |", "|---|---|---|---|---|---|---|"]
    for name, fam in sorted(fit.families.items()):
        slope = fam.slope()
        exp = "n/a"
        if slope is not None:
            key, value, ci = slope
            exp = f"{key} = {sig(value)} [{sig(ci.p10)}, {sig(ci.p90)}]"
        h1 = next((h for h in fam.holdouts if h.k == 1), None)
        held = f"{h1.points[0].error:+.3g}, {_pct(h1.mean_share_of_gain)}" if h1 and h1.points else "n/a"
        comp = fit.comparisons.get(name)
        mult = (f"{sig(comp.multiplier, 3)}x [{sig(comp.interval80[0], 3)}, {sig(comp.interval80[1], 3)}] at {comp.y_target:.4f}"
                if comp else ("reference" if name == fit.reference_family else "n/a"))
        lines.append(f"| {name} | {fam.choice.chosen or 'none'} | {exp} | {held} | {mult} | {len(fam.points)} | "
                     f"{sum(p.n for p in fam.points)} |")
    lines.append("")
    if fit.comparisons:
        lines += [f"Compute multiplier: the {AXES[fit.axis]} {fit.reference_family} needs divided by what the family needs to "
                  "reach the same quality (the better of the two families' worst-of-best fitted values); > 1 means the "
                  "family is more compute-efficient.", ""]
    for name, ds in sorted(fit.data_scaling.items()):
        p = ds.fit.params
        ci = ds.bootstrap.ci80 if ds.bootstrap else {}
        rng = lambda k: f" [{sig(ci[k][0], 3)}, {sig(ci[k][1], 3)}]" if k in ci else ""  # noqa: E731
        lines += [f"**{name}, model and data size** (L = E + A/N^α + B/D^β; N = forward multiply-adds/example, "
                  f"D = examples; {ds.n_points} points over data sizes {', '.join(f'{v:,}' for v in ds.data_sizes)}; "
                  f"fit {'ok' if ds.fit.ok else 'NOT ok: ' + ds.fit.message}): E = {sig(p['E'])}{rng('E')}, "
                  f"A = {sig(p['A'])}, B = {sig(p['B'])}, α = {sig(p['alpha'])}{rng('alpha')}, β = {sig(p['beta'])}{rng('beta')}; "
                  f"compute-optimal N_opt ∝ C^{sig(ds.fit.a, 3)}{rng('a')}, D_opt ∝ C^{sig(ds.fit.b, 3)}. "
                  "The 1-D fits below use the largest data size.", ""]
    lines += _other_axis_table(fit)
    for name, why in fit.skipped.items():
        lines.append(f"- {name}: not fitted ({why}).")
    if fit.dropped:
        lines += ["", f"**Dropped runs** ({len(fit.dropped)}):", ""] + [f"- {rid}: {why}" for rid, why in fit.dropped]
    lines.append("")
    for name, fam in sorted(fit.families.items()):
        lines += _family_section(fam, fit)
    lines += [
        "## How the fits were made", "",
        "- Points: per size, runs that differ only in a tuned key "
        f"({', '.join(fit.tune) or 'none'}) are compared on the validation half of the held-out set; the best "
        "value's seeds are averaged on the test half (mean, standard error, n).",
        "- Forms: saturating power law y = E + A·x^−α and plain power law y = A·x^−α, fitted in log space with the "
        "log-sum-exp parameterisation, summed Huber loss (δ = 1e-3), L-BFGS-B from a grid of starts (α ∈ "
        "{0.05 … 1.6}, E ∈ {0.001 … 0.999}·min y, log A around the data), tolerances ftol 1e-12 / gtol 1e-10, "
        "bounds α ∈ [1e-6, 5], E ≤ min y; log-linear y = a + b·ln x by least squares. A fit counts only if it "
        "converged (small projected gradient) and moved off its start.",
        "- Form choice: smallest absolute error at the held-out largest size; forms within 10% (or the seed "
        "s.e.) of the best are tied and the lowest AIC (Gaussian, on y) wins.",
        f"- Uncertainty: {fit.n_resamples} bootstrap resamples over runs (seeds resampled within each size; "
        "a single-run size gets Gaussian noise with the pooled seed σ), warm-started fits; percentile intervals; "
        "the band is the 10th–90th percentile of the resampled curves.",
        "- Held-out: the chosen form refitted without the largest 1 and 2 sizes; share of gain = |error| / "
        "(y at the smallest size − observed).",
        "- Compute: forward FLOPs per example (2 × multiply-adds, embedding gathers excluded); train FLOPs = 3 × "
        "forward × examples.",
        "",
    ]
    return "\n".join(lines)
