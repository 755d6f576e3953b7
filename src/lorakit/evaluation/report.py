"""The comparison report written by ``lorakit compare``: ``report.md``, ``report.html`` and two plots.

* ``loss_curves.png``: every method's training loss (smoothed, averaged over seeds) on one chart.
* ``accuracy_vs_params.png``: task accuracy (mean and spread over seeds) against trainable parameters on a
  log axis (eval loss when no accuracy was measured).

Both documents come from the same tables, built once from ``results.json`` (:mod:`lorakit.evaluation.claims` computes
the statistics and the verdicts), so the Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.evaluation.claims import evaluate_claims
from lorakit.evaluation.evidence import RULES, TAIL, mean_curve, smooth, stat, summarize
from lorakit.util.files import atomic_write, write_json, write_text

LOSS_PLOT = "loss_curves.png"
ACC_PLOT = "accuracy_vs_params.png"
CURVE_PLOT = "learning_curves.png"

#: Table columns: ``(summary key, header, format of one value)``.
COLUMNS: list[tuple[str, str, str]] = [
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("adapter_bytes", "adapter file", "bytes"),
    ("final_train_loss", f"final train loss (last {TAIL})", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("choice_loss", "choice-set loss", "{:.4f}"),
    ("choice_accuracy", "choice accuracy", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("token_f1", "token F1", "{:.3f}"),
    ("forgetting", "forgetting (nats)", "{:+.4f}"),
    ("step_time_s", "step time (s)", "{:.3f}"),
    ("peak_rss_bytes", "peak RSS (training)", "bytes"),
    ("train_rss_increase_bytes", "train RSS +", "bytes"),
    ("peak_gpu_bytes", "peak GPU", "bytes"),
    ("saved_activation_bytes", "saved activations", "bytes"),
]


def _bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _cell(stat: dict[str, Any] | None, fmt: str) -> str:
    if not stat:
        return "–"
    one = _bytes if fmt == "bytes" else fmt.format
    spread = _bytes if fmt == "bytes" else fmt.replace("{:+", "{:").format  # a spread has no sign
    if stat["n"] > 1 and stat["std"] > 0:
        return f"{one(stat['mean'])} ± {spread(stat['std'])}"
    return one(stat["mean"])


def metrics_table(results: dict[str, Any], summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (columns with no value in any row are dropped)."""
    cols = [c for c in COLUMNS if any(summary[lab].get(c[0]) for lab in results["labels"])]
    header = ["method", *[c[1] for c in cols]]
    rows = []
    for lab in results["labels"]:
        s = summary[lab]
        name = lab if not s["failed"] else f"{lab} ({len(s['failed'])} failed)"
        rows.append([name, *[_cell(s.get(key), fmt) for key, _, fmt in cols]])
    base = results.get("base") or {}
    if base.get("ok"):
        rows.append(["base model (before)", *["0" if key == "trainable_params" else
                                               _cell(_one(base, key), fmt) for key, _, fmt in cols]])
    return header, rows


def _one(base: dict[str, Any], key: str) -> dict[str, Any] | None:
    v = base.get(key)
    b0 = (base.get("budgets") or [{}])[0]
    if key in ("choice_loss", "choice_accuracy"):
        v = b0.get(key)
    return {"mean": v, "std": 0.0, "n": 1} if isinstance(v, int | float) and key in (
        "eval_loss", "accuracy", "token_f1", "choice_loss", "choice_accuracy") else None


def label_curve(results: dict[str, Any], label: str, key: str = "choice_loss") -> dict[int, dict[str, Any]]:
    """``step -> stat`` of ``label``'s ``key`` at each budget of the comparison, over its successful runs' seeds
    (steps where no run measured it are left out)."""
    steps = (results.get("compare") or {}).get("budgets") or []
    runs = [r for r in results["runs"] if r["label"] == label and r.get("ok") and r.get("budgets")]
    out = {}
    for step in steps:
        st = stat([b[key] for r in runs for b in r["budgets"] if b["step"] == step and b.get(key) is not None])
        if st:
            out[step] = st
    return out


def curve_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The learning curves: each label's choice-set loss (and accuracy where measured) at each budget, mean over
    seeds; ``None`` without budgets."""
    steps = (results.get("compare") or {}).get("budgets")
    if not steps:
        return None
    rows = []
    for lab in results["labels"]:
        loss, acc = label_curve(results, lab), label_curve(results, lab, "choice_accuracy")
        rows.append([lab, *("–" if s not in loss else f"{loss[s]['mean']:.4f}"
                            + (f" / {acc[s]['mean']:.3f}" if s in acc else "") for s in steps)])
    return ["method", *[f"step {s}" for s in steps]], rows


def plateau_note(results: dict[str, Any], reference: str = "lora") -> str | None:
    """Whether ``reference``'s learning curve has flattened: its mean choice-set loss between the last two budgets,
    against the declared loss margin (a verdict read on a curve that still falls is about the budget as much as the
    method). ``None`` without two budgets or without the reference label."""
    steps = (results.get("compare") or {}).get("budgets") or []
    curve = label_curve(results, reference)
    if len(steps) < 2 or not {*steps[-2:]} <= curve.keys():
        return None
    a, b = steps[-2:]
    la, lb = curve[a], curve[b]
    margin = float(((results.get("compare") or {}).get("margins") or {}).get("loss", 0.03))
    drop = la["mean"] - lb["mean"]
    if drop > margin:
        return (f"Budget: {reference}'s choice-set loss still fell {drop:.3f} nats from step {a} to step {b} (more "
                f"than the {margin:g}-nat loss margin): its learning curve has not flattened, so the verdicts describe "
                f"this budget as much as the methods.")
    if -drop > margin:
        return (f"Budget: {reference}'s choice-set loss rose {-drop:.3f} nats from step {a} to step {b} (more than "
                f"the {margin:g}-nat loss margin): the curve is past its minimum (overfitting, or a rate too high for "
                "this budget).")
    return (f"Budget: {reference}'s choice-set loss changed by {-drop:+.3f} nats from step {a} to step {b} (within "
            f"the {margin:g}-nat loss margin): its learning curve has flattened at this budget.")


def plot_curves(results: dict[str, Any], path: Path) -> Path | None:
    """Choice-set loss against the budget (steps), mean over seeds: the learning curves the verdicts are read on."""
    steps = (results.get("compare") or {}).get("budgets")
    if not steps:
        return None
    fig, ax = _figure()
    for lab in results["labels"]:
        pts = [(st, v["mean"]) for st, v in label_curve(results, lab).items()]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (log)")
    ax.set_ylabel("choice-set loss (nats/token, held-out words)")
    ax.set_title("Learning curves: held-out loss at each budget (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_lines():
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def settings_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-method options and training overrides."""
    rows = []
    for lab in results["labels"]:
        m = dict(results["methods"].get(lab, {}))
        method = m.pop("method", lab)
        training = m.pop("training", {}) or {}
        opts = ", ".join(f"{k}={v}" for k, v in m.items())
        over = ", ".join(f"{k}={v}" for k, v in training.items())
        rows.append([lab, method, opts or "defaults", over or "–"])
    return ["label", "method", "adapter options", "training overrides"], rows


# --- plots ------------------------------------------------------------------------------------------------------
def _figure(width: float = 8, height: float = 4.5) -> tuple[Any, Any]:
    # object API with an explicit Agg canvas: no display and no pyplot global state
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_loss_curves(results: dict[str, Any], path: Path) -> Path:
    """Training loss of every method on one chart (trailing mean over :data:`TAIL` steps, mean over seeds)."""
    fig, ax = _figure()
    for lab in results["labels"]:
        curve = smooth(mean_curve(results, lab))
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=lab, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of last {TAIL} steps)")
    ax.set_title("Training loss, same data, steps and seed")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_params(results: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """Accuracy (eval loss if none) against trainable parameters, log x axis.

    Error bars: the spread over seeds when there are several, else the binomial standard error of the
    accuracy. Methods at the same point share one marker and one label.
    """
    key = "accuracy" if any(summary[lab].get("accuracy") for lab in results["labels"]) else "eval_loss"
    points: dict[tuple[float, float], list[str]] = {}
    bars: dict[tuple[float, float], float | None] = {}
    for lab in results["labels"]:
        p, y = summary[lab].get("trainable_params"), summary[lab].get(key)
        if p and y and p["mean"] > 0:
            xy = (p["mean"], y["mean"])
            points.setdefault(xy, []).append(lab)
            bars[xy] = y["std"] if y["n"] > 1 else _binomial_se(summary[lab]) if key == "accuracy" else None
    fig, ax = _figure(7, 4.5)
    for (x, y), labs in points.items():
        ax.errorbar(x, y, yerr=bars[(x, y)], fmt="o", capsize=3)
        ax.annotate(", ".join(labs), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    base = results.get("base") or {}
    if isinstance(base.get(key), int | float):
        ax.axhline(base[key], color="grey", linestyle="--", linewidth=1, label="base model (before)")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    several = len(results.get("seeds") or []) > 1
    bar_note = "bars: spread over seeds" if several else "bars: ±1 binomial s.e." if key == "accuracy" else ""
    ax.set_ylabel("task accuracy (exact match)" if key == "accuracy" else "eval loss")
    ax.set_title(f"{'Accuracy' if key == 'accuracy' else 'Eval loss'} vs trainable parameters"
                 + (f" ({bar_note})" if bar_note else ""))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def _binomial_se(entry: dict[str, Any]) -> float | None:
    acc, n = entry.get("accuracy"), entry.get("examples")
    if not acc or not n or not sum(n["values"]):
        return None
    p, total = acc["mean"], sum(n["values"])
    return (p * (1 - p) / total) ** 0.5


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, fig.savefig)


# --- documents --------------------------------------------------------------------------------------------------
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _context(results: dict[str, Any]) -> list[str]:
    t = results.get("training", {})
    d = results.get("data", {})
    acc = (results.get("compare") or {}).get("accuracy") or {}
    f1 = (results.get("compare") or {}).get("f1") or {}
    forgetting = (results.get("compare") or {}).get("forgetting")
    evald = f"`{display_path(d.get('eval'))}`" if d.get("eval") else \
        f"a held-out {d.get('eval_fraction', 0):.0%} split of the training data (seeded, never trained on)"
    lines = [f"Model: `{results.get('model')}`; training data: `{display_path(d.get('train'))}`, eval data: "
             f"{evald}, max_length {d.get('max_length')}.",
             f"Every method: {t.get('max_steps')} steps, batch {t.get('batch_size')} x grad_accum "
             f"{t.get('grad_accum')}, {t.get('schedule')} schedule, warm-up {t.get('warmup_steps')}, "
             f"seeds {results.get('seeds')}, device {t.get('device')}, precision {t.get('precision')}.",
             *([f"Learning rates: each method's best on the learning-rate sweep `{results['lr_sweep']['path']}` "
                f"(made by `{results['lr_sweep'].get('command')}`, scored on a held-out split of the training "
                "data, never on the eval data above); the sweep's grid is in results.json (`lr_sweep`)."]
               if results.get("lr_sweep") else []),
             f"Accuracy: greedy generation (max {acc.get('max_new_tokens')} new tokens) on the first "
             f"{acc.get('examples')} eval prompts, exact match of `lorakit.evaluation.tasks.extract_answer`."
             if acc else "Accuracy: not measured.",
             *([f"Token F1: greedy generation (max {f1.get('max_new_tokens')} new tokens, cut at the first line "
                f"break) on the first {f1.get('examples') or 'all'} rows of `{display_path(f1.get('data'))}`, "
                "bag-of-words F1 against each row's completion (`lorakit.evaluation.generation.token_f1`)."]
               if f1 else []),
             "Forgetting: loss on general text that no run trains on, after training minus before (mean "
             f"nats per token; `{display_path(forgetting)}`)." if forgetting else "Forgetting: not measured.",
             "Step time: median wall time between optimizer steps. Peak RSS (training): peak resident memory "
             "of the run's own process while training (Linux VmHWM reset before training; ru_maxrss where that "
             "is unavailable), including Python, torch and the loaded model; train RSS +: that peak minus the "
             "RSS just before training. Peak GPU: torch.cuda.max_memory_allocated. Saved activations: bytes "
             "autograd keeps for backward in one training step (parameters excluded).",
             *([_cpu_timing_note(results)] if t.get("device") == "cpu" else []),
             "Process RSS includes the Python/torch runtime and allocator caching, so on a model this small "
             "differences of tens of MB are noise; the saved-activations column is exact and deterministic.",
             "Training loss is the loss the trainer logs, including method regularisers (rank1-sum's "
             "orthogonality term); the eval loss is the plain loss on the completions of the eval file.",
             *(["One seed: the seed-to-seed spread is unmeasured, so no quality claim gets a verdict (rerun with "
                "compare.seeds: [0, 1, 2], the default)."]
               if len(results.get("seeds") or []) == 1 else []),
             *_contention(results),
             *([f"Note: {results['note']}"] if results.get("note") else []),
             f"lorakit {results.get('lorakit_version')}, {results.get('created')}, host "
             f"{(results.get('host') or {}).get('platform')} ({(results.get('host') or {}).get('cpus')} CPUs)."]
    return lines


#: A CPU run that got less than this share of its threads' CPU time while training shared the cores.
CONTENDED = 0.7


def _cpu_timing_note(results: dict[str, Any]) -> str:
    cmp = results.get("compare") or {}
    n = int(cmp.get("parallel") or 1)
    how = ("methods run one after another, each in its own process" if n == 1 else
           f"runs go {n} at a time ({cmp.get('threads')} thread(s) each), each in its own process, so every step "
           "time is measured while other runs share the memory bandwidth")
    return (f"On the CPU, {how}: on a shared virtual machine the step time of the same method can differ by 1.5x "
            "or more between runs (the host's load changes), so read it as a rough cost; `lorakit bench` "
            "interleaves the methods in one process and is the speed measurement.")


def cpu_use(run: dict[str, Any]) -> float | None:
    """CPU seconds per wall second while training, as a share of the run's threads (``None`` off CPU)."""
    if not run.get("ok") or run.get("peak_gpu_bytes") is not None or not run.get("train_s"):
        return None
    if run.get("train_cpu_s") is None or not run.get("threads"):
        return None
    return run["train_cpu_s"] / run["train_s"] / run["threads"]


def _contention(results: dict[str, Any]) -> list[str]:
    """Warnings for CPU runs that got well under their threads' CPU time while training (another job shared
    the cores, so their step time is inflated)."""
    out = []
    for r in results["runs"]:
        use = cpu_use(r)
        if use is not None and use < CONTENDED:
            out.append(f"Warning: {r['label']} (seed {r['seed']}) trained while another job shared the CPU "
                       f"({use:.0%} of {r['threads']} threads' time): its step time is inflated.")
    return out


def display_path(path: str | None) -> str | None:
    """A path relative to the package or the working directory, so reports do not carry machine paths."""
    if not path:
        return path
    p = Path(path)
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        try:
            return str(p.resolve().relative_to(root))
        except ValueError:
            continue
    return str(path)


def _samples(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One sample generation of the base model and of each method (first seed)."""
    out = []
    base = results.get("base") or {}
    if base.get("samples"):
        out.append(("base model", base["samples"][0]))
    seen = set()
    for r in results["runs"]:
        if r.get("ok") and r.get("samples") and r["label"] not in seen:
            seen.add(r["label"])
            out.append((r["label"], r["samples"][0]))
    return out


def missing_runs(results: dict[str, Any]) -> dict[str, list[int]]:
    """``{label: seeds without a result}`` for each label short of a run (a comparison stopped early, or still
    running: results.json is rewritten after each run)."""
    seeds = results.get("seeds") or []
    have = {(r.get("label"), r.get("seed")) for r in results.get("runs") or []}
    missing = {lab: [s for s in seeds if (lab, s) not in have] for lab in results.get("labels") or []}
    return {lab: m for lab, m in missing.items() if m}


def unfinished_note(results: dict[str, Any]) -> str | None:
    """What a comparison stopped early has not run yet, or ``None`` when every (label, seed) has a result."""
    missing = missing_runs(results)
    if not missing:
        return None
    seeds = results.get("seeds") or []
    total = len(results.get("labels") or []) * len(seeds)
    which = "; ".join(lab + ("" if len(m) == len(seeds) else f" (seed {', '.join(map(str, m))})")
                      for lab, m in missing.items())
    return (f"Incomplete: {total - sum(map(len, missing.values()))} of {total} runs have results; not run yet: "
            f"{which}. The comparison stopped early or is still running; its command with `--resume` runs only "
            "the missing ones.")


def render_markdown(results: dict[str, Any], summary: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    parts = ["# lorakit method comparison", ""]
    unfinished = unfinished_note(results)
    parts += [f"**{unfinished}**", ""] if unfinished else []
    if results.get("command"):
        parts += ["Reproduce with:", "", "```", results["command"], "```", ""]
    parts += [*(f"- {line}" for line in _context(results)), "", "## Results", "",
              _md_table(*metrics_table(results, summary)), "",
              "Values are mean ± spread (standard deviation) over seeds when there are several.", "",
              f"![loss curves]({LOSS_PLOT})", "", f"![accuracy vs parameters]({ACC_PLOT})", ""]
    curves = curve_table(results)
    if curves:
        parts += ["## Learning curves", "", "Choice-set loss / choice accuracy at each budget (mean over seeds); "
                  "the verdicts below are read at the last budget and checked across them.", "",
                  _md_table(*curves), "", f"![learning curves]({CURVE_PLOT})", ""]
        plateau = plateau_note(results)
        parts += [plateau, ""] if plateau else []
    if claims:
        parts += ["## Claims of the method papers on this task", "", f"Decision rules (fixed before the run): {RULES} "
                  f"The family: {claims[0].get('tests', 0)} tests.", ""]
    for c in claims:
        parts += [f"### {c['claim']}", "", f"**Verdict: {c['verdict']}**", "", f"Source: {c['source']}.", "",
                  f"Rule: {c['rule']}.", "", *(f"- {n}" for n in c["numbers"]), ""]
    parts += ["## Settings per method", "", _md_table(*settings_table(results)), ""]
    failed = [r for r in results["runs"] if not r.get("ok")]
    if failed:
        parts += ["## Failed runs", ""]
        parts += [f"- {r['label']} (seed {r['seed']}): {r.get('error')}" + (
            f" (its measurements at steps {', '.join(str(b['step']) for b in r['budgets'])} are kept in "
            "results.json; the run is in no verdict)" if r.get("budgets") else "") for r in failed]
        parts.append("")
    samples = _samples(results)
    if samples:
        parts += ["## Sample generations (first eval prompt)", ""]
        for who, smp in samples:
            parts += [f"**{who}** (answer {smp['answer']}, predicted {smp['predicted']}):", "", "```",
                      (smp["prompt"] + smp["completion"]).strip(), "```", ""]
    return "\n".join(parts)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}img{max-width:100%}"
        ".supported{color:#1a7f37}.refuted{color:#cf222e}.inconclusive{color:#9a6700}")


def render_html(results: dict[str, Any], summary: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lorakit method comparison</title>",
             f"<style>{_CSS}</style></head><body><h1>lorakit method comparison</h1>"]
    unfinished = unfinished_note(results)
    parts += [f"<p><b>{e(unfinished)}</b></p>"] if unfinished else []
    if results.get("command"):
        parts.append(f"<p>Reproduce with:</p><pre>{e(results['command'])}</pre>")
    parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in _context(results)) + "</ul>")
    parts += ["<h2>Results</h2>", _html_table(*metrics_table(results, summary)),
              "<p>Values are mean ± spread (standard deviation) over seeds when there are several.</p>",
              f"<img src='{LOSS_PLOT}' alt='loss curves'><img src='{ACC_PLOT}' alt='accuracy vs parameters'>"]
    curves = curve_table(results)
    if curves:
        parts += ["<h2>Learning curves</h2>", _html_table(*curves), f"<img src='{CURVE_PLOT}' alt='learning curves'>"]
        plateau = plateau_note(results)
        parts += [f"<p>{e(plateau)}</p>"] if plateau else []
    if claims:
        parts.append("<h2>Claims of the method papers on this task</h2>")
        parts.append(f"<p>Decision rules (fixed before the run): {e(RULES)} The family: "
                     f"{claims[0].get('tests', 0)} tests.</p>")
    for c in claims:
        cls = c["verdict"].split(" ")[0]
        parts += [f"<h3>{e(c['claim'])}</h3>", f"<p class='{cls}'><b>Verdict: {e(c['verdict'])}</b></p>",
                  f"<p>Source: {e(c['source'])}.<br>Rule: {e(c['rule'])}.</p>",
                  "<ul>" + "".join(f"<li>{e(n)}</li>" for n in c["numbers"]) + "</ul>"]
    parts += ["<h2>Settings per method</h2>", _html_table(*settings_table(results))]
    failed = [r for r in results["runs"] if not r.get("ok")]
    if failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li>{e(r['label'])} (seed {r['seed']}): {e(str(r.get('error')))}</li>" for r in failed) + "</ul>")
    samples = _samples(results)
    if samples:
        parts.append("<h2>Sample generations (first eval prompt)</h2>")
        for who, smp in samples:
            parts.append(f"<p><b>{e(who)}</b> (answer {e(smp['answer'])}, predicted {e(str(smp['predicted']))}):"
                         f"</p><pre>{e((smp['prompt'] + smp['completion']).strip())}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the plots into ``out``; add ``summary`` and ``claims`` to
    ``results.json``. Returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    claims = evaluate_claims(results, summary)
    absent = ("not compared", "was not run", "no learning-rate grid")
    if all(any(a in c["verdict"] for a in absent) for c in claims if c["id"] != "lr-sensitivity"):
        # e.g. a learning-rate sweep: no claim has its methods here, except the one judged on a grid
        claims = [c for c in claims if c["id"] == "lr-sensitivity" and not c["verdict"].startswith(
            "inconclusive (no learning-rate grid")]
    files = [plot_loss_curves(results, out / LOSS_PLOT), plot_accuracy_vs_params(results, summary, out / ACC_PLOT)]
    curve = plot_curves(results, out / CURVE_PLOT)
    if curve is not None:
        files.append(curve)
    for name, text in (("report.md", render_markdown(results, summary, claims)),
                       ("report.html", render_html(results, summary, claims))):
        files.append(write_text(out / name, text))
    results = {**results, "summary": summary, "claims": claims}
    files.append(write_json(out / "results.json", results, indent=1, allow_nan=False))
    return files


__all__ = ["display_path", "plot_accuracy_vs_params", "plot_loss_curves", "render_html", "render_markdown",
           "write_report"]
