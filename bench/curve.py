"""Time to accuracy (`bench/accuracy.py --curve 1,3,5,15,60`): how the defaults' figures grow with training.

For each category, ONE bundle with the defaults trains once; after each listed minute a snapshot of the
model is written as a full bundle (diffinspect.train `snapshots=`), then each snapshot is calibrated,
exported to INT8 (`inspect export B --precision int8`) and evaluated with the backend `inspect score`
would pick (the INT8 export when it passes its self-check; the precision used is recorded). Figures:
image AUROC (also without magnetic_tile's twinned good photos, see accuracy.twins), pixel AUROC, AUPRO
and misses at the calibrated threshold (1 %, or 2.5 % where the holdout cannot bound 1 %).
Beside them: the best classical baseline of the evaluation (it does not train over time: one row, with
the CPU time its fit took) and DRAEM (bench/peer_draem.py in the peer's venv), trained once and scored
after the same minutes.

A minute is a CPU minute: the training process's CPU time divided by the threads it trains on
(diffinspect.train.loop.cpu_minutes), which is a wall minute on that many idle cores; the time taken
to write or score a snapshot is not counted. On a loaded machine a wall clock would count the other
jobs' share of the cores, so the same budget would buy fewer steps. Set the threads with
DIFFINSPECT_THREADS (diffinspect) and OMP_NUM_THREADS (DRAEM); with more threads than free cores, the
threads' spin-waits count as CPU time too, so use one thread on a busy machine.

    DIFFINSPECT_THREADS=1 OMP_NUM_THREADS=1 python bench/accuracy.py ../shared/datasets/ball_screw \\
        --workdir /tmp/acc --curve 1,3,5,15,60 --peer-venv /work/peer-venv

Writes WORKDIR/curve_<category>_<tag>.json per category, then the table (markdown) and the plot
(WORKDIR/curve_<tag>.png) of every curve_*_<tag>.json in WORKDIR, so categories may run separately.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

from accuracy import calibrate, run, twin_free_view

from diffinspect.bundle import Bundle, is_bundle
from diffinspect.config import load_config
from diffinspect.evaluation.evaluate import evaluate
from diffinspect.train import train
from diffinspect.train.api import snapshot_path

METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
           ("miss_rate", "misses at the threshold"))


def headline(report: dict, cat: Path, method: str) -> dict:
    """A method's figures on the category, with image AUROC also on the twin-free view when there is one."""
    full = report["datasets"][cat.name][method]
    figs = {k: full.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "miss_rate", "false_reject_rate")}
    free = report["datasets"].get(f"{cat.name}_twin_free", {}).get(method)
    if free is not None:
        figs["image_auroc_twin_free"] = free.get("image_auroc")
    return figs


class BaselineTimer:
    """A progress callback that measures the CPU seconds evaluate() spends fitting the baselines."""

    def __init__(self) -> None:
        self.seconds, self.t0 = 0.0, None

    def __call__(self, task: str, done: int, total: int | None, **detail: float) -> None:
        if "baseline" not in task:
            return
        if total is None:
            self.t0 = time.process_time()
        elif self.t0 is not None:
            self.seconds += time.process_time() - self.t0
            self.t0 = None


def _every_100_steps(task: str, step: int, total: int | None, **detail: float) -> None:
    if step % 100 == 0:
        print(f"{task}: step {step}, loss {detail.get('loss', float('nan')):.4f}", flush=True)


def curve_of(cat: Path, minutes: list[float], args) -> dict:  # noqa: ANN001 (accuracy.py's argparse namespace)
    bundle = (args.workdir / f"{cat.name}_{args.tag}").resolve()
    snaps = [snapshot_path(bundle, m) for m in minutes]
    if not (args.reuse and all(is_bundle(p) for p in snaps)):
        if args.train_args:
            raise SystemExit("--curve trains the defaults: drop --train-args")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        train(cat, bundle, load_config(), overwrite=True, snapshots=minutes, progress=_every_100_steps)
    views = Path(tempfile.mkdtemp(prefix="curve_"))
    datasets = [cat] + [v for v in (twin_free_view(cat, bundle, views, args.twins),) if v is not None]
    saved = args.workdir / f"curve_{cat.name}_{args.tag}.json"
    out = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    if [r["minutes"] for r in out.get("diffinspect", [])] != minutes:
        out = evaluate_snapshots(cat, minutes, snaps, datasets, args)
    saved.write_text(json.dumps(out, indent=1))
    if args.draem_minutes != "none":
        from peers import peer_python, run_draem

        draem = [float(m) for m in (args.draem_minutes or ",".join(f"{m:g}" for m in minutes)).split(",")]
        python = peer_python((args.peer_venv or args.workdir / "peer-venv").resolve())
        rate = Bundle.load(snaps[-1], verify=False).manifest.calibration.false_reject_rate
        got = run_draem(python, cat, bundle, draem, args.draem_size, views, rate)
        out["draem"] = []
        for m, figs in got.items():
            free = figs.pop("twin_free", None)
            row = {"minutes": m, "steps": figs.pop("steps"), "size": args.draem_size, **figs}
            if free is not None:
                row["image_auroc_twin_free"] = free["image_auroc"]
            out["draem"].append(row)
        saved.write_text(json.dumps(out, indent=1))
    return out


def evaluate_snapshots(cat: Path, minutes: list[float], snaps: list[Path], datasets: list[Path], args) -> dict:  # noqa: ANN001
    """Calibrate, export INT8 and evaluate each snapshot; the baselines are fitted and scored once."""
    kinds = [k for k in args.baselines.split(",") if k]
    out: dict = {"category": cat.name, "minutes": minutes, "diffinspect": [], "classical": None, "draem": []}
    for i, (m, snap) in enumerate(zip(minutes, snaps, strict=True)):
        calibrate(snap, args.calibrate_args)
        try:
            run("export", str(snap), "--precision", "int8")
        except subprocess.CalledProcessError:
            print(f"{snap.name}: no INT8 export (see above); evaluated with the backend that loads", flush=True)
        timer = BaselineTimer()
        report = evaluate([snap], datasets, args.workdir / f"report_{snap.name}", kinds if i == 0 else [],
                          progress=timer)
        training = Bundle.load(snap, verify=False).manifest.training
        out["diffinspect"].append({"minutes": m, "steps": training.steps, "wall_seconds": training.seconds,
                                   "precision": report["models"]["diffinspect"]["precision"],
                                   **headline(report, cat, "diffinspect")})
        if i == 0 and kinds:
            main = report["datasets"][datasets[-1].name]  # the twin-free view where there is one
            classical = [k for k in main if k not in ("diffinspect", "copod_fallback")]
            best = max(classical, key=lambda k: main[k].get("image_auroc") or 0.0)
            out["classical"] = {"name": best, "fit_cpu_seconds_all_baselines": round(timer.seconds, 1),
                                **headline(report, cat, best)}
        print(table([out]), flush=True)
    return out


def _cell(figs: dict, key: str) -> str:
    v = figs.get(key)
    if not isinstance(v, float):
        return "-"
    if key == "miss_rate":
        return f"{v:.0%}"
    free = figs.get(f"{key}_twin_free")
    return f"{v:.3f}" + (f" ({free:.3f})" if isinstance(free, float) else "")


def table(curves: list[dict]) -> str:
    lines = ["| set | detector | CPU minutes | steps | image AUROC (twin-free) | pixel AUROC | AUPRO | misses |",
             "|---|---|---|---|---|---|---|---|"]
    for c in curves:
        cells = lambda f: " | ".join(_cell(f, k) for k, _ in METRICS)  # noqa: E731
        for r in c["diffinspect"]:
            lines.append(f"| {c['category']} | diffinspect ({r['precision']}) | {r['minutes']:g} | {r['steps']:,} "
                         f"| {cells(r)} |")
        if c["classical"]:
            k = c["classical"]
            lines.append(f"| {c['category']} | best classical ({k['name']}) | no training "
                         f"({k['fit_cpu_seconds_all_baselines']:g} CPU s to fit all baselines) | - | {cells(k)} |")
        for r in c["draem"]:
            lines.append(f"| {c['category']} | DRAEM {r['size']} px | {r['minutes']:g} | {r['steps']:,} | {cells(r)} |")
    return "\n".join(lines)


def _value(figs: dict, key: str) -> float | None:
    """The plotted figure: image AUROC without twinned good photos where the set has them."""
    return figs.get(f"{key}_twin_free", figs.get(key))


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, PercentFormatter

    fig, grid = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    axes = grid.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks = sorted({r["minutes"] for c in curves for r in c["diffinspect"] + c["draem"]})
    for c, color in zip(curves, colors, strict=False):
        for ax, (key, _) in zip(axes, METRICS, strict=True):
            for rows, style, who in ((c["diffinspect"], "o-", "diffinspect"), (c["draem"], "s--", "DRAEM")):
                pts = [(r["minutes"], _value(r, key)) for r in rows if isinstance(_value(r, key), float)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=color, label=f"{c['category']}, {who}")
            k = c["classical"]
            if k and isinstance(_value(k, key), float):
                ax.axhline(_value(k, key), color=color, linestyle=":",
                           label=f"{c['category']}, {k['name']} (no training)")
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if key == "miss_rate":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("CPU minutes of training")
        ax.set_title(label + (" (twin-free where twins)" if key == "image_auroc" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    print(f"plot in {path}")


def main(categories: list[Path], minutes: list[float], args) -> None:  # noqa: ANN001
    for cat in categories:
        curve_of(cat, minutes, args)
    curves = [json.loads(p.read_text()) for p in sorted(args.workdir.glob(f"curve_*_{args.tag}.json"))]
    print(table(curves))
    plot(curves, args.workdir / f"curve_{args.tag}.png")
