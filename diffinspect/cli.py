"""The `inspect` / `diffinspect` command line: each command is a thin call into the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from diffinspect import DiffinspectError
from diffinspect.config import DISTILL_DEFECT_SHARE
from diffinspect.vocab import (
    After,
    Backend,
    Detector,
    Device,
    FrameDetector,
    Fusion,
    ModelKind,
    ModelSize,
    Overlays,
    Sampler,
)

app = typer.Typer(
    name="inspect",
    help="Visual inspection with diffusion models trained on good parts only.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _cores_busy() -> bool:
    """At least half the cores this process may use are already busy (1-minute load average)."""
    from diffinspect.engines.exports import available_cores  # torch-free

    try:
        return os.getloadavg()[0] >= available_cores() / 2
    except OSError:
        return False


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    from diffinspect.logs import show_on

    # Before any command imports torch (OpenMP reads it once): on cores already busy (a watcher, a second
    # training rank, the capture software) a spinning OpenMP thread holds the core the thread it waits for
    # needs, so threads sleep there; alone on quiet cores spinning is faster (bench/threads.py measures both).
    if _cores_busy():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    show_on(console)
    try:
        code = app(standalone_mode=False)  # returns the exit code of typer.Exit here
        if isinstance(code, int) and code:
            sys.exit(code)
    except DiffinspectError as exc:
        _fail(str(exc))
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:
        # Usage errors (unknown option, missing or malformed argument). Typer vendors click since 0.29, so
        # its own base class is caught here rather than click's, which may not be installed.
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `inspect`: the help already printed is the answer
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{exc.format_message() or type(exc).__name__}{where}")
    except OSError as exc:
        # A path the user named that the system refuses (read-only, full disk, not a folder): one line.
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def _fail(message: str) -> None:
    # escape: messages name extras such as diffinspect[train], which rich would read as markup; one line
    # even when a message quotes a path holding a newline.
    message = " ".join(message.split())
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _flag(*names: str, help: str):
    """A boolean flag; the empty metavar keeps the help from showing `<bool>` as if it took a value."""
    return typer.Option(False, *names, metavar="", help=help)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise DiffinspectError(f"{what} not found: {path}")
    return path


class _Bar:
    """The commands' one progress bar: draws the library's progress calls (diffinspect.logs.Progress), a
    row per task. `minutes`: the run's time budget, shown beside its clock."""

    def __init__(self, minutes: float | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # transient: an error ends a command as one line, not a half-drawn bar and the line; the
        # command's last line says what was done.
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=True)
        self.minutes = minutes
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, task: str, done: int, total: int | None, **detail: float) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(escape(task), total=total, info="")
        self.bar.update(self.tasks[task], completed=done, total=total, info=self.info(done, detail))

    def info(self, done: int, detail: dict[str, float]) -> str:
        """loss 0.01234  2.50 it/s  1.5/10 min: the figures, the rate on the run's clock, the budget."""
        seconds = detail.pop("seconds", None)
        parts = [f"{name} {value:.4g}" for name, value in detail.items()]
        if seconds:
            parts.append(f"{done / seconds:.2f} it/s")
            if self.minutes:
                parts.append(f"{seconds / 60:.1f}/{self.minutes:g} min")
        return escape("  ".join(parts))


def _backend(name: str | None) -> None:
    """Refuse an unknown backend of ./inspect.toml even where the bundle would not use one (COPOD-only)."""
    if name is not None and name not in Backend.values():
        raise DiffinspectError(f"unknown backend {name!r}: choose one of {Backend.listed()}")


def _size_text(size: object) -> str:
    """A manifest input size as people write it: 64 px, or 64x160 px (height x width)."""
    if isinstance(size, list) and len(size) == 2:
        return f"{size[0]}x{size[1]} px"
    return f"{size} px"


def _image_size(text: str | None) -> int | list[int] | None:
    """--image-size: "64" (a square) or "64x160" (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    raise DiffinspectError(f"--image-size must be a side (64) or HEIGHTxWIDTH (64x160), got {text!r}")


@app.command()
def train(
    data: Path = typer.Argument(..., help="MVTec category (uses train/good) or a folder of good images; with "
                                "--add-good, the bundle to fine-tune."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Bundle folder to write."),
    add_good: Path | None = typer.Option(None, "--add-good", help="Fine-tune the bundle DATA on the good images "
                                         "in this folder and its reviewed good parts, then calibrate it again "
                                         "(default --steps: a quarter of its first training's)."),
    model: ModelKind | None = typer.Option(None, "--model", help="unet or dit (default: unet)."),
    size: ModelSize | None = typer.Option(None, "--size", help="tiny, small or base (default: small)."),
    image_size: str | None = typer.Option(
        None, "--image-size", help="Model input: a side (64) or HEIGHTxWIDTH (64x160); default: from the frames."),
    defect_size: int | None = typer.Option(
        None, "--defect-size", help="Smallest defect to find, in frame pixels (default: 16); sets the input size."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop cleanly after this many minutes."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (default: 16)."),
    holdout: float | None = typer.Option(None, "--holdout", help="Share of good images kept for calibration."),
    config: Path | None = typer.Option(None, "--config", help="TOML config (flags override it)."),
    device: Device | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    resume: bool = _flag("--resume", help="Continue from the last checkpoint of --out."),
    overwrite: bool = _flag("--overwrite", help="Replace an existing bundle at --out."),
    distill_steps: int | None = typer.Option(None, "--distill-steps", help="Also distil a 1-4 step student."),
    backbone: Path | None = typer.Option(
        None, "--backbone", help="A pretrained feature network you have (a torchvision ResNet / Wide-ResNet "
        "state dict .pt/.pth, or an ONNX feature model): its features feed the patch term; copied into the bundle."),
) -> None:
    """Train a diffusion model on photos of good parts and write a model bundle (or fine-tune one)."""
    from diffinspect.bundle import TRAIN_HINT, check_output
    from diffinspect.config import load_config
    from diffinspect.train import train as run_train

    if add_good is not None and backbone is not None:
        raise DiffinspectError("--backbone is chosen when a bundle is first trained, not with --add-good")
    if add_good is not None:
        _finetune(data, add_good, steps, max_minutes, device, seed, resume, distill_steps)
        return
    if out is None:
        raise DiffinspectError("name the bundle to write: inspect train DATA --out BUNDLE")
    _existing(data, "data folder")
    check_output(out, overwrite, resume, TRAIN_HINT)
    cfg = load_config(config, {
        "model.kind": model, "model.size": size, "data.image_size": _image_size(image_size),
        "data.defect_size": defect_size, "train.steps": steps,
        "train.max_minutes": max_minutes, "train.batch_size": batch_size, "data.holdout": holdout,
        "train.device": device, "train.seed": seed, "score.backbone.file": backbone and str(backbone)})
    with _Bar(cfg.train.max_minutes) as bar:
        bundle = run_train(data, out, cfg, resume=resume, overwrite=overwrite, progress=bar)
    if bundle is None:  # a torchrun rank other than 0: rank 0 writes the bundle and reports
        return
    console.print(f"bundle written to [bold]{bundle.path}[/]; next: inspect calibrate {bundle.path}")
    if distill_steps:
        from diffinspect.train.distill import distill as run_distill

        run_distill(bundle.path, steps=distill_steps)


def _finetune(bundle: Path, add_good: Path, steps: int | None, max_minutes: float | None, device: str | None,
              seed: int | None, resume: bool, distill_steps: int | None) -> None:
    from diffinspect.train.finetune import finetune

    _existing(bundle, "bundle")
    _existing(add_good, "folder of good images")
    with _Bar(max_minutes) as bar:
        result = finetune(bundle, add_good, steps, max_minutes, device, seed, resume, bar)
    console.print(f"fine-tuned {result.steps} steps on {result.images} good images ({result.new} new to the "
                  f"bundle, {result.reviewed} reviewed good parts now trained on); bundle {bundle}")
    if result.recalibrated:
        console.print(f"calibrated again: {result.recalibrated}")
    if distill_steps:
        from diffinspect.train.distill import distill as run_distill

        run_distill(bundle, steps=distill_steps)


@app.command()
def calibrate(
    bundle: Path | None = typer.Argument(None, help="Bundle to calibrate (omit with --detector copod)."),
    normal_dir: Path | None = typer.Argument(None, help="Good images; default: the training holdout."),
    false_reject_rate: float = typer.Option(0.01, "--false-reject-rate", help="Target rate of good parts rejected."),
    detector: Detector = typer.Option(Detector.DIFFUSION, "--detector",
                                      help="diffusion, or copod for a COPOD-only bundle."),
    out: Path | None = typer.Option(None, "--out", help="With --detector copod: the bundle folder to write."),
    backend: Backend = typer.Option(Backend.AUTO, "--backend", help="auto, torch, onnxruntime or openvino."),
    device: str = typer.Option("auto", "--device", help="Device for the backend."),
    sampler: Sampler | None = typer.Option(None, "--sampler", help="teacher or student (default: the bundle's)."),
    tune: bool = _flag("--tune", help="Pick t* and the map recipe on synthetic defects first."),
    fusion: Fusion | None = typer.Option(None, "--fusion", help="How the embedding score joins the diffusion "
                                      "score: minp, sum or max (default: the bundle's)."),
    frame_detector: FrameDetector | None = typer.Option(None, "--frame-detector", help="The detector on the frame "
                                              "embeddings: gaussian, knn (the nearest good parts: where good parts "
                                              "come in several looks) or copod (default: the bundle's)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Set the threshold so that, with this confidence, "
                                     "it rejects at most --false-reject-rate of good parts (needs enough images; "
                                     "otherwise the average bound holds, and it says why). "
                                     "0 asks for the average bound only."),
    exclude_suspects: bool = _flag("--exclude-suspects", help="Calibrate again without the calibration images "
                                   "that look defective (listed either way)."),
    add_reviewed: Path | None = typer.Option(None, "--add-reviewed", help="Results folder of `inspect watch`: "
                                             "copy the frames reviewed \"good part\" on the station into the "
                                             "bundle and calibrate with them added."),
) -> None:
    """Set the OK/NG threshold from good parts only, with a stated false-reject bound."""
    from diffinspect.scoring.threshold import describe_bound

    if detector == "copod":
        from diffinspect.scoring.cold_start import calibrate_copod_only

        if add_reviewed is not None:
            raise DiffinspectError("--add-reviewed adds to a bundle's calibration images: not with --detector copod")

        folder = normal_dir or bundle
        if folder is None or out is None:
            raise DiffinspectError("usage: inspect calibrate --detector copod GOOD_DIR --out BUNDLE")
        n, thr = calibrate_copod_only(_existing(folder, "folder"), out, false_reject_rate, exclude_suspects)
        console.print(f"COPOD bundle written to {out}: threshold {thr:.4g}")
        console.print(describe_bound(n, false_reject_rate))
        return
    if bundle is None:
        raise DiffinspectError("name the bundle to calibrate: inspect calibrate BUNDLE [GOOD_DIR]")
    from diffinspect.scoring.calibrate import calibrate as run_calibrate

    if add_reviewed is not None:
        _add_reviewed(bundle, add_reviewed)
    if tune:
        from diffinspect.train.tune import tune as run_tune

        run_tune(bundle)
    with _Bar() as bar:
        result = run_calibrate(bundle, normal_dir, false_reject_rate, backend, device, sampler,
                               progress=bar, fusion=fusion,
                               frame_detector=frame_detector, confidence=confidence or None,
                               exclude_suspects=exclude_suspects)
    console.print(f"threshold [bold]{result.threshold:.4g}[/] (pixel {result.pixel_threshold:.4g}) "
                  f"on {result.backend}; statistics from {result.n_reference} images")
    console.print(result.bound)
    if result.copod_threshold is not None:
        console.print(f"COPOD fallback fitted, threshold {result.copod_threshold:.4g}")


def _add_reviewed(bundle: Path, out: Path) -> None:
    from diffinspect.bundle import Bundle
    from diffinspect.store.reviews import reviewed_good_files

    files, gone = reviewed_good_files(_existing(out, "results folder"))
    n = 0
    if files:
        with Bundle.load(bundle).updating() as up:
            n = up.add_images(files, "calibration", "reviewed good parts", str(out.resolve()))
    console.print(f"{n} reviewed good part(s) added to the calibration images ({len(files) - n} already in the "
                  f"bundle" + (f"; {gone} skipped: their frame file is gone)" if gone else ")"))


@app.command()
def score(
    bundle: Path = typer.Argument(..., help="Calibrated bundle, or a product of \\[watch.products] in ./inspect.toml."),
    paths: list[Path] = typer.Argument(..., help="Images or folders of images."),
    as_json: bool = _flag("--json", help="One JSON object per line per image."),
    overlay_dir: Path | None = typer.Option(None, "--overlay-dir", help="Write heatmap overlays here."),
    detector: Detector = typer.Option(Detector.DIFFUSION, "--detector", help="diffusion or copod."),
    backend: Backend = typer.Option(Backend.AUTO, "--backend", help="auto, torch, onnxruntime or openvino."),
    device: str = typer.Option("auto", "--device", help="Device for the backend."),
    sampler: Sampler | None = typer.Option(None, "--sampler", help="teacher or student (default: the bundle's)."),
) -> None:
    """Score images: label, score and optional heatmap overlay per image."""
    import json

    from diffinspect.scoring.inspector import Inspector
    from diffinspect.scoring.score import expand_paths, score_paths

    _backend(backend)
    bundle, product = _product_bundle(bundle)
    inspector = Inspector.load(bundle, backend, device, sampler, detector)
    engine = getattr(inspector.detector, "engine", None)
    if backend == "auto" and hasattr(engine, "selection"):
        console.print(f"backend {engine.selection}", highlight=False, soft_wrap=True)  # stderr
    files = expand_paths([_existing(p, "path") for p in paths])
    if not files:
        raise DiffinspectError("no images found in the given paths")
    records = []
    for rec in score_paths(inspector, files, overlay_dir):
        rec.product = product
        records.append(rec)
        if as_json:
            print(json.dumps(rec.to_dict(), allow_nan=False), flush=True)  # never a NaN token
    if not as_json:
        _print_records(records)
    if all(r.status == "error" for r in records):
        raise typer.Exit(1)


def _product_bundle(name: Path) -> tuple[Path, str | None]:
    """A product of [watch.products] in ./inspect.toml as (its bundle, its name); any other path as it is."""
    from diffinspect.bundle import is_bundle
    from diffinspect.config import load_watch_settings

    if is_bundle(name) or len(name.parts) != 1:
        return name, None
    products = load_watch_settings().products
    return (Path(products[name.name]), name.name) if name.name in products else (name, None)


def _print_records(records) -> None:
    from rich.table import Table

    table = Table("image", "label", "score", "threshold", "ms", "overlay / error")
    colors = {"ok": "green", "ng": "bold red", "error": "yellow"}
    for r in records:
        table.add_row(Path(r.path).name, f"[{colors[r.status]}]{r.status.upper()}[/]",
                      "" if r.score is None else f"{r.score:.3f}", f"{r.threshold:.3f}",
                      "" if r.latency_ms is None else f"{r.latency_ms:.1f}", r.error or r.overlay or "")
    Console().print(table)


@app.command()
def watch(
    folders: list[Path] = typer.Argument(..., help="Camera folders to watch (one per camera)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Bundle (default: ./inspect.toml, else ./model)."),
    out: Path | None = typer.Option(None, "--out", help="Results folder (default: ./inspect_results)."),
    backend: Backend | None = typer.Option(None, "--backend", help="auto, torch, onnxruntime or openvino."),
    device: str | None = typer.Option(None, "--device", help="Device for the backend."),
    batch: int | None = typer.Option(None, "--batch", help="Frames scored together (micro-batch) (default: 8)."),
    overlays: Overlays | None = typer.Option(None, "--overlays", help="Heatmap overlays for: ng, all or none."),
    after: After | None = typer.Option(None, "--after", help="After a frame's row is committed: keep, move or delete."),
    recursive: bool = _flag("--recursive", help="Watch sub-folders too."),
    pattern: str | None = typer.Option(None, "--pattern", help="Only file names matching this glob."),
    once: bool = _flag("--once", help="Score the backlog, then exit."),
    quiet: bool = _flag("--quiet", help="Plain log lines instead of the live view."),
    max_latency_ms: float | None = typer.Option(None, "--max-latency-ms",
                                                help="Frames that would miss this deadline go to the fallback."),
    max_megapixels: float = typer.Option(50.0, "--max-megapixels", help="Larger frames get an error row."),
    on_alarm: str | None = typer.Option(None, "--on-alarm", help="While a lighting, focus or camera-moved alarm "
                                        "is open for a camera: flag (default) or hold (its verdicts are hold: "
                                        "rejected to manual check)."),
    mqtt: str | None = typer.Option(None, "--mqtt", help="Publish every verdict to this MQTT broker, "
                                    "e.g. mqtt://broker:1883 (more under \\[watch.mqtt] in ./inspect.toml)."),
    opcua: str | None = typer.Option(None, "--opcua", help="Write every verdict to this PLC's OPC UA server, "
                                     "e.g. opc.tcp://plc:4840 (nodes under \\[watch.opcua.nodes] in ./inspect.toml)."),
) -> None:
    """Watch camera folders and score every frame exactly once; the line never stops."""
    from diffinspect.config import WATCH_FILE, load_outputs, load_watch_settings
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.logs import show_stamped
    from diffinspect.scoring.inspector import Inspector

    settings = load_watch_settings()
    bundle = model or Path(settings.model or "model")
    from diffinspect.bundle import is_bundle

    # With several products a station may have no bundle of its own: frames then need a product.
    if not is_bundle(bundle) and not (settings.products and model is None and settings.model is None):
        raise DiffinspectError(f"no model bundle at {bundle}: pass --model BUNDLE, or set model = \"...\" "
                               f"under [watch] in ./{WATCH_FILE}")
    for f in folders:
        if not f.is_dir():
            raise DiffinspectError(f"camera folder not found: {f}")
    backend = backend or settings.backend or "auto"
    _backend(backend)
    device = device or settings.device or "auto"

    def factories(b: Path):
        return (lambda: Inspector.load(b, backend, device)), (lambda: Inspector.fallback(b))

    per_folder = {Path(folder).resolve(): factories(Path(b)) for folder, b in settings.cameras.items()
                  if b not in settings.products}
    # A flag wins over the file; where neither is given, WatchOptions keeps its own default.
    given = {"batch": batch if batch is not None else settings.batch,  # --batch 0 is refused, not the default
             "overlays": overlays or settings.overlays, "overlay_format": settings.overlay_format,
             "after": after or settings.after,
             "max_latency_ms": max_latency_ms or settings.max_latency_ms,
             "on_alarm": on_alarm or settings.on_alarm}
    options = WatchOptions(recursive=recursive, pattern=pattern, once=once, quiet=quiet,
                           max_megapixels=max_megapixels, retention=settings.retention,
                           alarm_lambda=settings.alarm_lambda,
                           **{k: v for k, v in given.items() if v is not None})
    make_detector, make_fallback = factories(bundle) if is_bundle(bundle) else (None, None)
    mqtt_cfg, opcua_cfg = load_outputs({"mqtt": settings.mqtt, "opcua": settings.opcua}, mqtt, opcua)
    products = _products(settings, mqtt_cfg, opcua_cfg, factories) if settings.products else None
    outputs = _outputs(mqtt_cfg, opcua_cfg)
    out = out or Path(settings.out or "inspect_results")
    if quiet:
        show_stamped()  # a service's log: time-stamped lines on stderr
    summary = run_watch(folders, out, make_detector, make_fallback, options, per_folder=per_folder or None,
                        outputs=outputs, products=products)
    held = f"hold {summary.hold}, " if summary.hold else ""
    console.print(f"scored {summary.scored} frames (ok {summary.ok}, ng {summary.ng}, {held}error {summary.error}, "
                  f"fallback {summary.fallback}); {summary.fps:.1f} frames/s while scoring, "
                  f"{summary.elapsed_s:.1f} s in all")
    for name, counts in summary.products.items():
        console.print(f"  product {name}: ok {counts['ok']}, ng {counts['ng']}, hold {counts['hold']}, "
                      f"error {counts['error']}", highlight=False)
    if summary.archived:
        console.print(f"{summary.archived} row(s) older than {settings.retention.days:g} days moved to "
                      f"{out / 'archive'}", highlight=False)
    if summary.uncommitted:  # a disk full beyond the floor: the frames are scored again on the next start
        console.print(f"[bold red]error:[/] {summary.uncommitted} frame(s) have no row: results.db could not "
                      f"be written (see the warnings); they are scored on the next start", highlight=False)
        raise typer.Exit(1)
    if outputs:
        from diffinspect.outputs.outbox import pending

        results_db = out / "results.db"
        waiting = {o.name: pending(results_db, o.name) for o in outputs}
        for o in outputs:
            console.print(f"{o.name}: {o.acknowledged_rows} verdict(s) acknowledged in this run; "
                          f"{waiting[o.name]} waiting in {results_db}")
        if any(waiting.values()):  # the rows are safe in results.db; the next run delivers them first
            console.print(f"[bold red]error:[/] verdicts not yet delivered: "
                          f"{', '.join(f'{n} {name}' for name, n in waiting.items() if n)}", highlight=False)
            raise typer.Exit(1)


def _products(settings, mqtt_cfg, opcua_cfg, factories):  # noqa: ANN001, ANN202
    """[watch.products] as the watcher takes it: each product's bundle, the cameras that name a product, and the
    line-wide signals (the MQTT command topic, the PLC's product node), in that order of precedence."""
    from diffinspect.bundle import is_bundle
    from diffinspect.line.products import ProductSetup
    from diffinspect.outputs.outbox import OutputError

    for name, bundle in settings.products.items():
        if not is_bundle(Path(bundle)):
            raise DiffinspectError(f"no model bundle at {bundle} (watch.products.{name} in ./inspect.toml)")
    sources: list = []
    try:
        if mqtt_cfg is not None:
            from diffinspect.outputs.mqtt import ProductTopic

            sources.append(ProductTopic(mqtt_cfg))
        if opcua_cfg is not None and opcua_cfg.nodes.product:
            from diffinspect.outputs.opcua import ProductNode

            sources.append(ProductNode(opcua_cfg, lambda text: console.print(f"warning: {text}", highlight=False)))
    except OutputError as exc:
        raise DiffinspectError(str(exc)) from None
    return ProductSetup(bundles={name: factories(Path(b)) for name, b in settings.products.items()},
                        folders={Path(f).resolve(): p for f, p in settings.cameras.items() if p in settings.products},
                        sources=sources)


def _outputs(mqtt_cfg, opcua_cfg) -> list:  # noqa: ANN001 (config.MqttConfig, OpcuaConfig, or None)
    from diffinspect.outputs.outbox import OutputError

    outputs: list = []
    try:
        if mqtt_cfg is not None:
            from diffinspect.outputs.mqtt import MqttOutput

            outputs.append(MqttOutput(mqtt_cfg))
        if opcua_cfg is not None and opcua_cfg.nodes.counter:  # a product node alone writes no verdicts
            from diffinspect.outputs.opcua import OpcuaOutput

            outputs.append(OpcuaOutput(opcua_cfg))
    except OutputError as exc:
        raise DiffinspectError(str(exc)) from None
    return outputs


@app.command()
def evaluate(
    bundles: list[Path] = typer.Argument(..., help="Bundle(s), then labelled dataset(s): BUNDLE... DATA..."),
    report: Path = typer.Option(Path("report"), "--report", help="Folder for report.html, summary.md, report.json."),
    baselines: str = typer.Option("iforest,ocsvm,copod", "--baselines", help="Comma list, or 'none'."),
    backend: Backend = typer.Option(Backend.AUTO, "--backend", help="auto, torch, onnxruntime or openvino."),
    device: str = typer.Option("auto", "--device", help="Device for the backend."),
    one_class: str | None = typer.Option(None, "--one-class", help="Class-folder data: this class is normal."),
    robustness: bool = _flag("--robustness", help="Also score under noise, blur, light, JPEG, shifts."),
) -> None:
    """Offline evaluation report: AUROC, AUPRO, rates at the threshold, baselines side by side."""
    from diffinspect.bundle import is_bundle
    from diffinspect.evaluation import require_extra

    require_extra()
    from diffinspect.evaluation.evaluate import evaluate as run_evaluate

    models = [p for p in bundles if is_bundle(p)]  # by its schema: datasets may hold a manifest.json too
    data = [p for p in bundles if p not in models]
    if not data:
        raise DiffinspectError("name at least one labelled dataset after the bundle(s)")
    for d in data:
        _existing(d, "dataset")
    kinds = [] if baselines.strip().lower() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    with _Bar() as bar:
        result = run_evaluate(models, data, report, kinds, backend, device, one_class, robustness, progress=bar)
    console.print(f"report written to {report / 'report.html'}")
    for name, methods in result["datasets"].items():
        for method, figs in methods.items():
            auroc = figs.get("image_auroc")
            console.print(f"  {name:20s} {method:22s} image AUROC "
                          + ("n/a" if auroc is None else f"{auroc:.3f}"))


@app.command()
def station(
    out: Path = typer.Argument(..., help="Results folder of `inspect watch` (holds results.db)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any other than 127.0.0.1 needs a token."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="TCP port (1-65535)."),
    token: str | None = typer.Option(None, "--token", envvar="DIFFINSPECT_STATION_TOKEN",
                                     help="Required on every request (?token=...); required off 127.0.0.1."),
    shifts: str = typer.Option("06:00,14:00,22:00", "--shifts", help="Shift start times (local), HH:MM,..."),
    server_name: list[str] = typer.Option([], "--server-name",
                                          help="A host name the page is opened by besides the bound address "
                                               "(checked against the Host header when there is no token)."),
    review_token: list[str] = typer.Option([], "--review-token", envvar="DIFFINSPECT_REVIEW_TOKEN",
                                           help="NAME=SECRET (repeatable): lets whoever holds SECRET review "
                                                "verdicts on the page, recorded as NAME. Without one the page "
                                                "cannot review."),
    bundle: Path | None = typer.Option(None, "--bundle", help="The line's bundle: its calibrated false-reject "
                                       "bound is shown beside the rate the reviews measure."),
) -> None:
    """A live web page over OUT/results.db: counts, trend, latency, rejects, health, drift alarms and reviews."""
    from diffinspect.station.app import check_bind, parse_reviewers, parse_shifts, serve, station_url

    _existing(out, "results folder")
    check_bind(host, token)
    parse_shifts(shifts)
    reviewers = parse_reviewers(review_token, token)
    bound = _calibrated_bound(bundle) if bundle is not None else None
    url = station_url(host, port, token)
    mode = f"reviews by {', '.join(reviewers)}" if reviewers else "read-only"
    console.print(f"station for {out} at {url} ({mode}; Ctrl-C stops it)", highlight=False, soft_wrap=True)
    serve(out, host, port, token, shifts, tuple(server_name), reviewers, bound)


def _calibrated_bound(path: Path) -> dict:
    from diffinspect.bundle import Bundle

    cal = Bundle.load(path, verify=False).manifest.calibration
    if cal is None:
        raise DiffinspectError(f"bundle {path} is not calibrated: it states no false-reject bound")
    return {"false_reject_rate": cal.false_reject_rate, "n": cal.n, "rule": cal.rule, "confidence": cal.confidence}


@app.command()
def reviews(
    out: Path = typer.Argument(..., help="Results folder of `inspect watch` (holds results.db)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write the reviews to this CSV file (default: stdout)."),
) -> None:
    """The operators' reviews of verdicts (from the station page), every one, oldest first, as CSV."""
    from diffinspect.store.reviews import all_reviews, write_csv

    db = _existing(out, "results folder") / "results.db"
    if not db.is_file():
        raise DiffinspectError(f"no results.db in {out}: name the results folder of `inspect watch`")
    rows = all_reviews(db)
    if csv is None:
        write_csv(rows, sys.stdout)
        return
    with open(csv, "w", newline="", encoding="utf-8") as f:
        write_csv(rows, f)
    console.print(f"{len(rows)} review(s) written to {csv}")


@app.command()
def distill(
    bundle: Path = typer.Argument(..., help="Trained bundle; the student is written into it."),
    steps: int = typer.Option(2, "--steps", help="Student DDIM steps: 1, 2 or 4."),
    teacher_steps: int = typer.Option(10, "--teacher-steps", help="DDIM steps of the teacher it learns from."),
    iterations: int | None = typer.Option(None, "--iterations", help="Distillation iterations (default: 1500)."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop cleanly after this many minutes."),
    device: Device = typer.Option(Device.AUTO, "--device", help="auto, cpu or cuda."),
    resume: bool = _flag("--resume", help="Continue from the last distillation checkpoint."),
    heal: float = typer.Option(
        DISTILL_DEFECT_SHARE, "--heal", help="Share of the student's inputs that carry a pasted synthetic defect "
        "it learns to remove (0: match the teacher only)."),
) -> None:
    """Distil the sampler to 1-4 steps; the checkpoint kept is the one that best finds synthetic defects."""
    from diffinspect.train.distill import distill as run_distill

    _existing(bundle, "bundle")
    with _Bar(max_minutes) as bar:
        result = run_distill(bundle, steps=steps, teacher_steps=teacher_steps, iterations=iterations,
                             max_minutes=max_minutes, device=device, resume=resume, progress=bar,
                             defect_share=heal)
    console.print(f"{result['steps']}-step student is now the default sampler of [bold]{bundle}[/]"
                  + ("" if result["calibration"] else f"; next: inspect calibrate {bundle}"))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo_run"), "--workdir", help="Where the line, model and results go."),
    fast: bool = _flag("--fast", help="A smaller line and model (about a minute; for tests)."),
) -> None:
    """Run a whole synthetic production line: train, distil, calibrate, export, watch, evaluate."""
    from rich.panel import Panel

    from diffinspect.bundle import Bundle
    from diffinspect.demo import run_demo
    from diffinspect.info import training_warning

    r = run_demo(workdir, fast=fast)
    h = r.headline
    manifest = Bundle.load(r.bundle, verify=False).manifest
    steps = manifest.training and manifest.training.steps
    warning = training_warning(manifest)

    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    body = "\n".join([
        f"report            {r.report}",
        f"results database  {r.results_db}  ({h['frames_scored']} rows for {r.frames_dropped} frames dropped, "
        f"{h['errors']} errors of {r.corrupt_dropped} corrupt)",
        f"NG overlays       {r.overlays}",
        *([f"MQTT              {h['mqtt_acknowledged']} verdicts acknowledged by the broker at {h['mqtt_url']}"]
          if h.get("mqtt_url") else []),
        f"model bundle      {r.bundle}  (runtime: {r.export}; trained {steps} steps)",
        *([f"[yellow]warning:[/] {escape(warning)}"] if warning else []),
        "",
        f"image AUROC {fmt(h['image_auroc'])}   pixel AUROC {fmt(h['pixel_auroc'])}   "
        f"false rejects {fmt(h['false_reject_rate'], '.1%')}   misses {fmt(h['miss_rate'], '.1%')}   "
        f"watch {fmt(h['frames_per_second'], '.1f')} frames/s",
        f"finished in {r.seconds / 60:.1f} min",
        f"station view      {r.station}",
    ])
    Console().print(Panel(body, title="diffinspect demo", expand=False))


@app.command()
def export(
    bundle: Path = typer.Argument(..., help="Calibrated bundle to export into."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, openvino or all."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 (OpenVINO), int8, or all."),
    calibration_dir: Path | None = typer.Option(None, "--calibration-dir",
                                                help="Good images for INT8 ranges and parity (default: holdout)."),
    allow_mismatch: bool = _flag("--allow-mismatch", help="Keep an export that fails parity."),
    sampler: Sampler | None = typer.Option(None, "--sampler", help="teacher or student (default: the bundle's)."),
) -> None:
    """Export the whole scoring step (ONNX / OpenVINO, fp32 / fp16 / INT8), checked against torch."""
    from diffinspect.export import export_bundle  # refuses in one line where torch is missing

    records = export_bundle(_existing(bundle, "bundle"), fmt, precision, calibration_dir, allow_mismatch,
                            sampler=sampler)
    console.print(escape(f"exported {', '.join(records)}; score with: inspect score {bundle} IMAGES --backend auto"),
                  highlight=False, soft_wrap=True)


@app.command()
def info(bundle: Path | None = typer.Argument(None, help="Bundle to summarize (optional).")) -> None:
    """Versions, onnxruntime providers and OpenVINO devices here, and what a bundle holds."""
    from diffinspect.info import bundle_summary, environment

    out = Console(soft_wrap=True)
    env = environment()
    out.print(f"diffinspect {env['diffinspect']} (python {env['python']})")
    out.print("  " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    out.print(f"  onnxruntime providers: {', '.join(env.get('onnxruntime_providers', [])) or 'none'}")
    devices = env.get("openvino_devices", {})
    out.print(f"  OpenVINO devices: {', '.join(f'{d} ({n})' for d, n in devices.items()) or 'none'}")
    if isa := env.get("openvino_cpu_isa"):
        out.print(f"  OpenVINO CPU: {isa}", highlight=False)
    if bundle is None:
        return
    s = bundle_summary(_existing(bundle, "bundle"))
    m, p = s["model"] or {}, s["preprocess"] or {}
    out.print(f"bundle {s['path']} (version {s['version']})")
    out.print(f"  model: {m.get('kind')} {m.get('size')}, {m.get('params', 0) / 1e6:.2f} M params, "
              f"{m.get('gflops', 0):.3g} GFLOPs/frame, {_size_text(m.get('image_size'))}, "
              f"{m.get('channels')} channel(s)")
    out.print("  preprocessing: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    if t := s["training"]:
        out.print(f"  training: {t['steps']} steps in {(t['seconds'] or 0) / 60:.1f} min "
                  f"({t['steps_per_second'] or 0:.2f} steps/s)")
    if s["training_warning"]:
        out.print(f"  [yellow]warning:[/] {escape(s['training_warning'])}")
    out.print("  files: " + ", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in s["files"].items()))
    cal = s["calibration"]
    out.print("  calibration: " + (f"threshold {cal['threshold']:.4g}, n={cal['n']}, target false-reject rate "
                                   f"{cal['false_reject_rate']:g}, on {cal['backend']}" if cal else "none")
              + (f"; embedding score fused by {cal['fusion']}" if cal and cal["fusion"] else ""))
    if cal:
        out.print(f"  guarantee: {escape(cal['guarantee'])}", soft_wrap=True)
    for name, e in s["exports"].items():
        par = e["parity"]
        figures = (f"rank corr {par['score_rank_correlation']:.4f}, map corr {par['map_correlation']:.4f}, "
                   f"max |Δmap| {par['max_abs_map_diff']:.3g}" if par else "no parity figures")
        out.print(f"  export {name}: {e['format']} {e['precision']} ({e['sampler']}): {figures}")


model_app = typer.Typer(help="A bundle's versions: list, show, activate (roll back), diff, prune.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.callback()
def model(ctx: typer.Context, bundle: Path = typer.Argument(..., help="The bundle folder.")) -> None:
    """Every change of a bundle (train, distill, tune, calibrate, export) is a version; one is active."""
    ctx.obj = _existing(bundle, "bundle")


@model_app.command("list")
def model_list(ctx: typer.Context) -> None:
    """Each version: number, parent, when, what changed, threshold; * marks the active one."""
    from rich.table import Table

    from diffinspect.bundle import version_rows

    table = Table("", "version", "parent", "when (UTC)", "command", "what changed", "threshold")
    for r in version_rows(ctx.obj):
        table.add_row("*" if r["active"] else "", str(r["version"]), str(r["parent"] or ""), r["created"] or "",
                      escape(r["command"]), escape(r["summary"]),
                      "" if r["threshold"] is None else f"{r['threshold']:.4g}")
    Console(width=200).print(table)


@model_app.command("show")
def model_show(ctx: typer.Context, number: int = typer.Argument(..., help="Version number.")) -> None:
    """A version's manifest (what it holds and where it came from), as JSON."""
    import json

    from diffinspect.bundle import Bundle

    b = Bundle.load(ctx.obj, verify=False, version=number)
    print(json.dumps(b.manifest.to_dict(), indent=1))


@model_app.command("activate")
def model_activate(ctx: typer.Context, number: int = typer.Argument(..., help="Version to make active.")) -> None:
    """Make a version the active one (a rollback is activating an older one); it is verified first."""
    from diffinspect.bundle import activate, active_version

    before = active_version(ctx.obj)
    activate(ctx.obj, number)
    console.print(f"version {number} of {escape(str(ctx.obj))} is active (was {before}); a running "
                  f"inspect watch swaps to it between batches", highlight=False)


@model_app.command("diff")
def model_diff(ctx: typer.Context, a: int = typer.Argument(..., help="One version."),
               b: int = typer.Argument(..., help="The other version.")) -> None:
    """The manifest keys whose values differ between two versions."""
    from diffinspect.bundle import diff_versions

    rows = diff_versions(ctx.obj, a, b)
    for key, va, vb in rows:
        print(f"{key}: {va!r} -> {vb!r}")
    if not rows:
        console.print(f"versions {a} and {b} have the same manifest", highlight=False)


@model_app.command("prune")
def model_prune(ctx: typer.Context, keep: int = typer.Option(..., "--keep", help="Versions to keep (newest).")) -> None:
    """Remove all but the newest KEEP versions; the active one is always kept."""
    from diffinspect.bundle import prune

    gone = prune(ctx.obj, keep)
    console.print(f"removed version(s) {', '.join(map(str, gone))}" if gone else "nothing to remove",
                  highlight=False)
