"""Bundle versions: every change is a new version, the active one a pointer switched atomically; rollback,
crash safety, bundles from before versions, `inspect model`, and watch swapping versions between batches."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from logged import logged
from test_hardening import run_cli
from test_station import browser  # noqa: F401 (the fixture)
from watch_fakes import wait_for

from diffinspect import DiffinspectError
from diffinspect import bundle as bundle_io
from diffinspect.bundle import ACTIVE, MANIFEST, Bundle, activate, diff_versions, prune, sha256_file, version_numbers
from diffinspect.scoring.cold_start import calibrate_copod_only


@pytest.fixture(scope="module")
def cold(line_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("versions") / "cold"
    calibrate_copod_only(line_dir / "train" / "good", out, 0.1)
    return out


@pytest.fixture
def bundle(cold: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(cold, path)
    return path


def rethreshold(path: Path, factor: float) -> Bundle:
    """A new version whose fallback threshold is `factor` times the active one's."""
    b = Bundle.load(path)
    with b.updating("test", f"threshold x{factor:g}") as up:
        up.manifest.fallback.threshold *= factor
    return b


def flat_copy(src: Path, dst: Path) -> Path:
    """The bundle as a diffinspect before versions wrote it: manifest.json and files at the top."""
    shutil.copytree(Bundle.load(src).folder, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest.pop("version")
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_a_new_bundle_is_version_1_and_a_change_writes_version_2_linking_unchanged_files(bundle: Path) -> None:
    b = Bundle.load(bundle)
    assert (b.version, b.folder, (bundle / ACTIVE).read_text()) == (1, bundle / "versions" / "1", "1\n")
    assert b.manifest.version.command == "calibrate --detector copod" and b.manifest.version.parent is None
    threshold = b.manifest.fallback.threshold
    rethreshold(bundle, 2.0)
    new = Bundle.load(bundle)
    assert (new.version, new.manifest.version.parent, new.manifest.version.command) == (2, 1, "test")
    assert new.manifest.version.summary == "threshold x2"
    assert new.manifest.fallback.threshold == 2 * threshold
    assert Bundle.load(bundle, version=1).manifest.fallback.threshold == threshold  # the old one is untouched
    emb = new.manifest.fallback.file
    assert os.path.samefile(new.folder / emb, b.folder / emb)  # kept files are links, not copies
    assert sorted(p.name for p in (bundle / "versions").iterdir()) == ["1", "2"]  # no working folder left


def test_rollback_activates_an_older_version_and_diff_names_what_changed(bundle: Path) -> None:
    rethreshold(bundle, 3.0)
    assert diff_versions(bundle, 1, 2) == [("fallback.threshold", pytest.approx(Bundle.load(bundle, version=1)
                                            .manifest.fallback.threshold), Bundle.load(bundle).manifest.fallback
                                            .threshold)]
    assert activate(bundle, 1).version == 1
    assert Bundle.load(bundle).version == 1
    rethreshold(bundle, 5.0)  # a change of the rolled-back version: parent 1, the next free number
    b = Bundle.load(bundle)
    assert (b.version, b.manifest.version.parent) == (3, 1)
    with pytest.raises(DiffinspectError, match="no version 9"):
        activate(bundle, 9)


def test_a_version_with_an_altered_file_is_never_activated(bundle: Path) -> None:
    b = rethreshold(bundle, 2.0)
    target = b.folder / "suspects.json"
    target.unlink()  # the version's own link; the other version's file is untouched
    target.write_text("{}")
    activate(bundle, 1)
    with pytest.raises(DiffinspectError, match="altered"):
        activate(bundle, 2)
    assert Bundle.load(bundle).version == 1


def test_a_failed_change_leaves_no_version_and_the_active_one_as_it_was(bundle: Path) -> None:
    before = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*"))
    b = Bundle.load(bundle)
    with pytest.raises(RuntimeError), b.updating("test") as up:
        up.write_bytes("extra.bin", b"x")
        raise RuntimeError("killed midway")
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")) == before
    assert b.version == 1 and Bundle.load(bundle).version == 1


def test_a_crash_before_the_pointer_moves_keeps_the_old_version_active(bundle: Path, monkeypatch) -> None:
    # A version half-written when the process died (a hidden folder, even with a manifest) is ignored.
    half = bundle / "versions" / ".new-crashed"
    shutil.copytree(bundle / "versions" / "1", half)
    # A version renamed into place, the pointer not yet switched: complete, but not active.
    monkeypatch.setattr(bundle_io, "_point", lambda root, n: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        rethreshold(bundle, 2.0)
    monkeypatch.undo()
    assert Bundle.load(bundle).version == 1 and version_numbers(bundle) == [1, 2]
    rethreshold(bundle, 4.0)
    assert Bundle.load(bundle).version == 3


def test_a_bundle_from_before_versions_loads_as_version_1_and_its_first_change_keeps_every_file(
        bundle: Path, tmp_path: Path) -> None:
    flat = flat_copy(bundle, tmp_path / "flat")
    digests = {p.name: sha256_file(p) for p in flat.iterdir()}
    b = Bundle.load(flat)
    assert (b.version, b.folder, b.manifest.version) == (1, flat, None)
    assert bundle_io.version_rows(flat)[0]["command"] == "(written before versions)"
    rethreshold(flat, 2.0)
    assert sorted(p.name for p in flat.iterdir()) == [ACTIVE, "versions"]
    assert {p.name: sha256_file(p) for p in (flat / "versions" / "1").iterdir()} == digests
    assert Bundle.load(flat, version=1).manifest.version is None
    assert (Bundle.load(flat).version, Bundle.load(flat).manifest.version.parent) == (2, 1)


def test_a_crash_while_turning_a_flat_bundle_into_versions_leaves_it_loadable(bundle: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    flat = flat_copy(bundle, tmp_path / "flat")
    threshold = Bundle.load(flat).manifest.fallback.threshold
    monkeypatch.setattr(bundle_io, "_point", lambda root, n: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        rethreshold(flat, 2.0)
    monkeypatch.undo()
    b = Bundle.load(flat)  # still the flat bundle: versions/1 exists, but no pointer yet
    assert (b.folder, b.manifest.fallback.threshold) == (flat, threshold)
    rethreshold(flat, 2.0)  # the next change finishes the move
    assert Bundle.load(flat).version == 2 and Bundle.load(flat, version=1).manifest.fallback.threshold == threshold


def test_prune_keeps_the_newest_and_the_active_version(bundle: Path) -> None:
    for factor in (2.0, 3.0, 4.0):
        rethreshold(bundle, factor)
    activate(bundle, 1)
    assert prune(bundle, keep=2) == [2]
    assert version_numbers(bundle) == [1, 3, 4] and Bundle.load(bundle).version == 1
    with pytest.raises(DiffinspectError):
        prune(bundle, keep=0)


def test_retraining_over_a_bundle_adds_a_version(bundle: Path) -> None:
    """train --overwrite (bundle.creating on an existing bundle) keeps the old model as a version."""
    old = Bundle.load(bundle)
    with bundle_io.creating(bundle, overwrite=True, command="train") as tmp:
        for name in old.manifest.files:
            shutil.copy(old.folder / name, tmp / name)
        bundle_io.finish(tmp, old.manifest, [])
    b = Bundle.load(bundle)
    assert (b.version, b.manifest.version.parent, b.manifest.version.command) == (2, 1, "train")
    assert Bundle.load(bundle, version=1).manifest.files == b.manifest.files


def test_inspect_model_lists_shows_diffs_activates_and_prunes(bundle: Path, capsys) -> None:
    rethreshold(bundle, 2.0)
    code, out, _ = run_cli(capsys, "model", bundle, "list")
    assert code == 0
    lines = [ln for ln in out.splitlines() if "calibrate --detector copod" in ln or "threshold x2" in ln]
    assert len(lines) == 2 and "*" in lines[1] and "*" not in lines[0]
    code, out, _ = run_cli(capsys, "model", bundle, "diff", "1", "2")
    assert code == 0 and out.startswith("fallback.threshold: ")
    code, out, _ = run_cli(capsys, "model", bundle, "show", "1")
    assert code == 0 and json.loads(out)["version"]["number"] == 1
    code, _, err = run_cli(capsys, "model", bundle, "activate", "1")
    assert code == 0 and "version 1" in err and Bundle.load(bundle).version == 1
    code, _, err = run_cli(capsys, "model", bundle, "activate", "7")
    assert code == 2 and err.strip() == f"error: bundle {bundle} has no version 7 (versions: 1, 2)"
    rethreshold(bundle, 3.0)  # version 3, parent 1, active
    activate(bundle, 1)
    code, _, err = run_cli(capsys, "model", bundle, "prune", "--keep", "1")
    assert code == 0 and "removed version(s) 2" in err and version_numbers(bundle) == [1, 3]  # newest, active


def test_score_json_names_the_version(bundle: Path, line_dir: Path, capsys) -> None:
    rethreshold(bundle, 2.0)
    image = next((line_dir / "test" / "good").glob("*.png"))
    code, out, _ = run_cli(capsys, "score", bundle, image, "--json")
    assert code == 0 and json.loads(out.splitlines()[0])["bundle_version"] == 2


# -- watch: a version activated while frames flow ---------------------------------------------------


class Camera:
    """Drops the synthetic line's frames into a folder, one every 20 ms, as a camera would."""

    def __init__(self, folder: Path, images: list[Path]) -> None:
        self.folder, self.images, self.n = folder, images, 0

    def drop(self, n: int = 1) -> None:
        for _ in range(n):
            tmp = self.folder / f"f{self.n:04d}.tmp"
            shutil.copy(self.images[self.n % len(self.images)], tmp)
            os.replace(tmp, self.folder / f"f{self.n:04d}.png")
            self.n += 1
            time.sleep(0.02)

    def until(self, cond, limit: int = 400) -> None:  # noqa: ANN001
        """Keep dropping frames (the lane looks at the pointer between batches) until cond() holds."""
        while not cond():
            assert limit > 0, "timed out"
            self.drop()
            limit -= 1


def test_watch_swaps_to_an_activated_version_between_batches_without_losing_a_frame(
        bundle: Path, line_dir: Path, tmp_path: Path) -> None:
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.scoring.inspector import Inspector

    thresholds = {1: Bundle.load(bundle).manifest.fallback.threshold}
    thresholds[2] = rethreshold(bundle, 2.0).manifest.fallback.threshold
    activate(bundle, 1)
    broken = rethreshold(bundle, 3.0)  # version 3, whose file is then damaged: it must never score
    (broken.folder / broken.manifest.fallback.file).unlink()
    activate(bundle, 1)
    images = sorted((line_dir / "test").glob("*/*.png"))
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    stop = threading.Event()
    opts = WatchOptions(quiet=True, stable_ms=50, empty_ms=200, settle_ms=300, rescan_seconds=0.5, batch=4,
                        pattern="*.png", stop=stop)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(s=run_watch(
        [cam], out, lambda: Inspector.load(bundle), lambda: Inspector.fallback(bundle), opts)))
    camera = Camera(cam, images)
    with logged() as said:
        try:
            thread.start()
            camera.drop(20)
            wait_for(lambda: len(_rows(out)) >= 10)
            (bundle / ACTIVE).write_text("3\n")  # by hand, past `activate`'s check: a version that cannot load
            camera.until(lambda: any("does not load" in m for m in said))
            camera.drop(10)
            activate(bundle, 2)  # frames keep coming while the lane loads it and swaps
            camera.until(lambda: any("bundle version 2 active" in m for m in said))
            camera.drop(20)
            wait_for(lambda: len(_rows(out)) >= camera.n, timeout=60)
        finally:
            stop.set()
            thread.join(60)
    rows = _rows(out)
    assert len(rows) == camera.n and len({r["path"] for r in rows}) == camera.n  # none lost, none doubled
    versions = [r["bundle_version"] for r in rows]
    assert versions == sorted(versions) and set(versions) == {1, 2}  # old, then new, never mixed back
    assert all(r["threshold"] == pytest.approx(thresholds[r["bundle_version"]]) for r in rows)
    assert sum("version 3 was activated but does not load" in m for m in said) == 1
    assert any("bundle version 2 active" in m for m in said)
    with sqlite3.connect(out / "results.db") as db:
        events = db.execute("SELECT kind, name FROM events").fetchall()
    assert events == [("version", "bundle version 2 active")]
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["bundle_version"] for r in jsonl] == versions


def _rows(out: Path) -> list[dict]:
    if not (out / "results.db").exists():
        return []
    db = sqlite3.connect(out / "results.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM frames ORDER BY id")]
    except sqlite3.Error:
        return []
    finally:
        db.close()


def test_training_then_calibration_are_versions_1_and_2(calibrated_bundle: Path) -> None:
    b = Bundle.load(calibrated_bundle)
    first = Bundle.load(calibrated_bundle, version=1)
    assert (b.version, b.manifest.version.parent, b.manifest.version.command) == (2, 1, "calibrate")
    assert (first.manifest.version.command, first.manifest.calibration) == ("train", None)
    assert b.manifest.version.summary.startswith("threshold none -> ")
    assert os.path.samefile(b.file("weights.pt"), first.file("weights.pt"))


def test_mqtt_says_the_version_scoring_each_camera_on_a_retained_topic(tmp_path: Path) -> None:
    from line_receivers import MOSQUITTO, Broker, Subscriber, frame_row
    from services import missing
    from test_line_outputs import Warnings, mqtt

    from diffinspect.outputs.outbox import Outbox
    from diffinspect.store.results import ResultStore

    if MOSQUITTO is None:
        missing("Debian's mosquitto (apt-get install mosquitto)")
    broker = Broker(tmp_path / "broker").start()
    try:
        store = ResultStore(tmp_path / "out")
        rows = [frame_row(i, "/line/cam1" if i < 6 else "/line/cam2") for i in range(8)]
        for row, version in zip(rows, [1, 1, 1, 2, 2, 2, 2, 2], strict=True):
            row.bundle_version = version
        sub = Subscriber(broker)
        with Outbox(store.db_path, [mqtt(broker)], Warnings(), poll_s=0.05):
            store.commit(rows)
            wait_for(lambda: len(sub.verdicts()) == 8)
        assert [m["bundle_version"] for m in sub.verdicts()] == [1, 1, 1, 2, 2, 2, 2, 2]
        assert sub.on("/cam1/version") == ["1", "2"] and sub.on("/cam2/version") == ["2"]  # once per change
        sub.close()
        late = Subscriber(broker)  # retained: a dashboard starting later sees the version scoring now
        wait_for(lambda: late.on("/cam1/version") == ["2"] and late.on("/cam2/version") == ["2"])
        late.close()
        store.close()
    finally:
        broker.stop()


def test_the_station_shows_the_version_that_scored_a_frame_and_the_swap_event(
        tmp_path: Path, browser) -> None:  # noqa: F811 (the fixture imported above)
    from selenium.webdriver.common.by import By
    from test_station import TOKEN, running, text_becomes
    from test_station import rows as station_rows

    from diffinspect.station.app import Station, create_app
    from diffinspect.store.results import ResultStore

    out = tmp_path / "out"
    store = ResultStore(out)
    made = station_rows(8, 0, time.time(), out)
    for i, row in enumerate(made):
        row.bundle_version = None if row.status == "error" else 1 if i < 4 else 3
    store.commit(made)
    store.add_events([(time.time(), "version", "bundle version 3 active", "raised", "model: version 3 scores "
                       "from this batch on (was 1)", "/cam")])
    state = Station(out).state()
    assert state["detector"]["version"] == 3 and state["alarms"] == []  # news, not an open alarm
    assert [e["name"] for e in state["events"]] == ["bundle version 3 active"]
    ng = [r for r in made if r.status == "ng"][0]  # frame 3, scored by version 1
    assert Station(out).frame(ng.id)["bundle_version"] == 1
    try:
        with running(create_app(out, TOKEN)) as port:
            browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
            assert text_becomes(browser, "hour-total", "8") == "8"
            assert "bundle version\n3" in browser.find_element(By.ID, "scoring").text
            assert "bundle version 3 active model: version 3" in browser.find_element(By.ID, "events").text
            browser.find_elements(By.CSS_SELECTOR, "#rejects figure")[-1].click()  # the oldest: frame 3
            assert text_becomes(browser, "frame-version", "1") == "1"
    finally:
        store.close()
