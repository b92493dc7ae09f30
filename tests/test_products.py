"""Several products on one station ([watch.products], line/products.py): the product of each frame by
sub-folder, camera folder, the retained MQTT command topic or the PLC's node, in force when the frame was
taken; changeovers over the real broker and the real OPC UA server with frames in flight, each frame
scored once, by the bundle of its product; unknown products held; drift kept per product."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from line_receivers import MOSQUITTO, Broker, LineController, PlcServer, Subscriber, wait_for
from services import needs
from watch_fakes import Factory, FakeDetector, db_rows, jsonl_rows, n_rows, write_frame

from diffinspect import DiffinspectError
from diffinspect.config import MqttConfig, OpcuaConfig, OpcuaNodes, load_outputs, load_watch_settings
from diffinspect.line.frame import Candidate
from diffinspect.line.options import WatchOptions
from diffinspect.line.products import Products, ProductSetup, Timeline
from diffinspect.line.say import WarnOnce
from diffinspect.line.watch import run_watch

needs_mosquitto = needs(MOSQUITTO is not None, "Debian's mosquitto (apt-get install mosquitto)")
FAKE_MANIFEST = '{"schema_version": 1, "diffinspect_version": "0", "files": {}}'


class FakeSignal:
    """A line-wide product signal driven by the test."""

    def __init__(self, name: str) -> None:
        self.name, self.ready, self.report = name, threading.Event(), None

    def start(self, report) -> None:  # noqa: ANN001
        self.report = report
        self.ready.set()

    def stop(self) -> None:
        pass


def pair(name: str) -> tuple[Factory, Factory]:
    return Factory(name=name, cost_s=0.03), Factory(name=f"{name}-fallback")


def cand(path: Path, folder: Path, taken: float) -> Candidate:
    return Candidate(path, folder, 1, int(taken * 1e9), taken + 0.5)


# -- choosing the product ---------------------------------------------------------------------------


def test_timeline_gives_the_product_in_force_at_a_time() -> None:
    t, now = Timeline(), time.time()
    assert t.at(now) is None
    assert t.set("housing", -math.inf) and not t.set("housing", now)  # the same product is no changeover
    assert t.set("cover", now + 10) and t.set(None, now + 20) and t.set("cover", now + 15)  # a clock step back
    assert [t.at(now + x) for x in (-1e9, 9.99, 10, 19, 20)] == ["housing", "housing", "cover", "cover", "cover"]
    assert t.now() == "cover"


def test_products_order_of_precedence_and_holds(tmp_path: Path) -> None:
    cam1, cam2, cam3 = tmp_path / "cam1", tmp_path / "cam2", tmp_path / "cam3"
    mqtt, plc = FakeSignal("mqtt"), FakeSignal("opcua")
    setup = ProductSetup({"housing": pair("housing"), "cover": pair("cover")}, folders={cam2: "cover"},
                         sources=[mqtt, plc])
    products = Products(setup, {cam3}, WatchOptions(), WarnOnce())
    for s in (mqtt, plc):
        s.start(products._reporter(s.name))
    own = object()

    def route(path: Path, folder: Path, taken: float = 100.0) -> tuple:
        r = products.route(cand(path, folder, taken), own if folder == cam3 else None)  # type: ignore[arg-type]
        if r.bundle is None or r.bundle is own:
            return r.product, r.bundle and "own", r.held
        return r.product, r.bundle.supervisor._make_primary.kwargs["name"], r.held

    assert route(cam1 / "f.png", cam1) == (None, None, "no product selected")
    assert route(cam3 / "f.png", cam3) == (None, "own", None)  # a camera with a bundle of its own
    plc.report("cover", 50.0)
    assert route(cam1 / "f.png", cam1) == ("cover", "cover", None)  # 4. the PLC's node
    assert route(cam1 / "f.png", cam1, 49.0) == (None, None, "no product selected")  # taken before it
    mqtt.report("housing", 60.0)
    assert route(cam1 / "f.png", cam1) == ("housing", "housing", None)  # 3. MQTT before the PLC
    assert route(cam1 / "f.png", cam1, 55.0) == ("cover", "cover", None)  # in flight: the PLC's was in force
    assert route(cam2 / "f.png", cam2) == ("cover", "cover", None)  # 2. the camera folder
    assert route(cam2 / "housing" / "f.png", cam2) == ("housing", "housing", None)  # 1. the sub-folder
    assert route(cam1 / "lid" / "f.png", cam1) == ("lid", None, "unknown product lid")
    assert route(cam3 / "2024-05-01" / "f.png", cam3) == ("housing", "housing", None)  # not a product there
    mqtt.report("lid", 70.0)
    assert route(cam1 / "f.png", cam1) == ("lid", None, "unknown product lid")  # held until fixed
    mqtt.report("cover", 80.0)
    assert route(cam1 / "f.png", cam1) == ("cover", "cover", None)


def test_watch_settings_check_the_products_table(tmp_path: Path) -> None:
    toml = tmp_path / "inspect.toml"
    toml.write_text('[watch.products]\nhousing = "models/housing"\ncover = "models/cover"\n'
                    '[watch.cameras]\n"feed/cam2" = "cover"\n')
    settings = load_watch_settings(toml)
    assert settings.products == {"housing": "models/housing", "cover": "models/cover"}
    assert settings.cameras == {"feed/cam2": "cover"}
    for table, key in (('"a/b" = "m"', "watch.products.'a/b'"), ('cover = 3', "watch.products.cover"),
                       ('cover = ""', "watch.products.cover")):
        toml.write_text(f"[watch.products]\n{table}\n")
        with pytest.raises(DiffinspectError, match=key.replace(".", r"\.")) as err:
            load_watch_settings(toml)
        assert "\n" not in str(err.value)
    # The command topic is the station's; a PLC node that only names the product needs no verdict nodes.
    with pytest.raises(DiffinspectError, match="product_topic"):
        load_outputs({"mqtt": {"url": "mqtt://b", "product_topic": "x/{camera}/product"}})
    _, opcua = load_outputs({"opcua": {"url": "opc.tcp://plc:4840", "nodes": {"product": "ns=3;s=P"}}})
    assert opcua is not None and opcua.nodes.product == "ns=3;s=P" and not opcua.nodes.counter
    with pytest.raises(DiffinspectError, match="nodes.counter"):
        load_outputs({"opcua": {"url": "opc.tcp://plc:4840"}})


def test_mqtt_command_topic_reads_the_retained_product_then_changeovers() -> None:
    from types import SimpleNamespace

    from diffinspect.outputs.mqtt import ProductTopic

    topic = ProductTopic(MqttConfig(url="mqtt://127.0.0.1:1", station="press 4"))
    assert topic.topic == "diffinspect/press 4/product"
    reported: list = []
    topic._report = lambda product, at: reported.append((product, at))
    topic._on_message(None, None, SimpleNamespace(payload=b" cover\n", retain=True))  # found at subscription
    before = time.time()
    topic._on_message(None, None, SimpleNamespace(payload=b"housing", retain=False))
    topic._on_message(None, None, SimpleNamespace(payload=b"", retain=True))  # cleared: names no product
    assert [p for p, _ in reported] == ["cover", "housing", None] and topic.product is None
    assert reported[0][1] == -math.inf and all(at >= before for _, at in reported[1:])


# -- changeovers with frames in flight ------------------------------------------------------------------


class Watcher:
    """run_watch in a thread with the products' fakes, until stopped."""

    def __init__(self, cams: list[Path], out: Path, setup: ProductSetup, outputs: list = ()) -> None:  # noqa: ANN001
        self.stop_event = threading.Event()
        opts = WatchOptions(quiet=True, stable_ms=20, overlays="none", batch=2, rescan_seconds=0.5,
                            stop=self.stop_event)
        self.summary = None

        def run() -> None:
            self.summary = run_watch(cams, out, None, None, opts, products=setup, outputs=outputs)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def drive_changeovers(cam: Path, out: Path, change, current) -> dict[str, str]:  # noqa: ANN001
    """Frames of housing, then cover, then an unknown product, then housing again; each changeover while the
    frames before it are still queued. Returns the expected product of every frame by path."""
    expected: dict[str, str] = {}
    phases = [("housing", 20), ("cover", 20), ("lid", 4), ("housing", 6)]
    for k, (product, n) in enumerate(phases):
        if k:
            change(product)
            wait_for(lambda p=product: current() == p, 10, f"the changeover to {product}")
            if k == 1:  # the first changeover came while frames of housing were still waiting to be scored
                assert n_rows(out) < phases[0][1]
            time.sleep(0.05)  # file times come from a coarser clock than ours
        for i in range(n):
            expected[str(write_frame(cam / f"{k}-{i:02d}.png", 40 + i))] = product
    wait_for(lambda: n_rows(out) == len(expected), 30, "every frame's row")
    return expected


def check_rows(out: Path, expected: dict[str, str], setup: ProductSetup) -> list[dict]:
    rows = db_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(expected)  # none lost, none twice
    for r in rows:
        product = expected[r["path"]]
        assert r["product"] == product
        if product in setup.bundles:
            assert (r["status"], r["detector"], r["fallback_reason"]) == ("ok", product, None)
        else:
            assert (r["status"], r["score"], r["hold_reason"]) == ("hold", None, f"unknown product {product}")
    for name, (primary, fallback) in setup.bundles.items():  # each bundle loaded once and kept
        assert primary.calls == 1 and fallback.calls == 1
        assert primary.made[0].seen == sum(p == name for p in expected.values())  # each frame scored once
    return rows


@needs_mosquitto
def test_changeover_over_the_real_broker_with_frames_in_flight(tmp_path: Path, capsys) -> None:
    from diffinspect.outputs.mqtt import MqttOutput, ProductTopic

    broker = Broker(tmp_path / "broker").start()
    change = LineController(broker, station="st1")
    try:
        change("housing")  # retained before the station starts: in force from the start
        sub = Subscriber(broker, topic="diffinspect/st1/+/verdict")
        cfg = MqttConfig(url=broker.url, station="st1")
        topic = ProductTopic(cfg)
        setup = ProductSetup({"housing": pair("housing"), "cover": pair("cover")}, sources=[topic])
        cam, out = tmp_path / "cam", tmp_path / "out"
        cam.mkdir()
        watcher = Watcher([cam], out, setup, [MqttOutput(cfg)])
        wait_for(lambda: topic.product == "housing", 15, "the retained product")
        expected = drive_changeovers(cam, out, change, lambda: topic.product)
        watcher.stop()
        rows = check_rows(out, expected, setup)
        said = capsys.readouterr()
        assert "WARNING" not in said.err and "hold   unknown product lid" in said.out  # quiet mode's lines
        wait_for(lambda: len(sub.verdicts()) == len(rows), 10, "every verdict over MQTT")
        assert {m["id"]: m["product"] for m in sub.verdicts()} == {r["id"]: r["product"] for r in rows}
        assert watcher.summary.products == {"housing": {"ok": 26, "ng": 0, "error": 0, "hold": 0},
                                            "cover": {"ok": 20, "ng": 0, "error": 0, "hold": 0},
                                            "lid": {"ok": 0, "ng": 0, "error": 0, "hold": 4}}
        sub.close()
    finally:
        change.close()
        broker.stop()

    from diffinspect.station.app import Station

    state = Station(out).state()
    assert {p["product"]: (p["total"], p["ok"], p["hold"]) for p in state["products"]} == {
        "housing": (26, 26, 0), "cover": (20, 20, 0), "lid": (4, 0, 4)}
    assert state["histogram"]["product"] == "housing" and state["histogram"]["n"] == 26  # the product on the line


def test_changeover_by_the_plc_node_with_frames_in_flight(tmp_path: Path) -> None:
    pytest.importorskip("asyncua")
    from diffinspect.outputs.opcua import ProductNode

    plc = PlcServer().start()
    try:
        plc.product.write_value("housing")
        node = ProductNode(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(product=f"ns={plc.ns};s=Vision.Product"),
                                       poll_s=0.05))
        setup = ProductSetup({"housing": pair("housing"), "cover": pair("cover")}, sources=[node])
        cam, out = tmp_path / "cam", tmp_path / "out"
        cam.mkdir()
        watcher = Watcher([cam], out, setup)
        wait_for(lambda: node.product == "housing", 15, "the product node")
        expected = drive_changeovers(cam, out, plc.product.write_value, lambda: node.product)
        watcher.stop()
    finally:
        plc.stop()
    check_rows(out, expected, setup)


# -- drift per product ---------------------------------------------------------------------------------


def test_drift_is_kept_per_product_and_a_changeover_is_not_drift(tmp_path: Path) -> None:
    """Two products alternate every 5 frames; then cover's light dims: its alarm raises on cover only and
    holds cover's verdicts, while housing's frames stay as they were."""
    from test_drift import _Steady, darker, scene

    from diffinspect.scoring.health import fit_health

    rng = np.random.default_rng(3)
    steady = {p: _Steady(fit_health([scene(rng) for _ in range(160)], {"copod": rng.normal(0, 1, 200)}))
              for p in ("housing", "cover")}
    cam, out = tmp_path / "cam", tmp_path / "out"
    t0 = 1_700_000_000
    for i in range(200):
        product = ("housing", "cover")[(i // 5) % 2]
        f = scene(rng)
        if product == "cover" and i >= 100:
            f = darker(f)
        p = cam / product / f"f{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), f)
        os.utime(p, (t0 + i, t0 + i))
    setup = ProductSetup({p: (lambda d=d: d, lambda d=d: d) for p, d in steady.items()})
    run_watch([cam], out, None, None, WatchOptions(once=True, quiet=True, overlays="none", on_alarm="hold"),
              products=setup)
    rows = db_rows(out)
    assert len(rows) == 200
    db = sqlite3.connect(out / "results.db")
    events = db.execute("SELECT name, state, folder FROM events").fetchall()
    db.close()
    assert events == [("lighting changed", "raised", f"{cam} [cover]")]
    assert not any(r["status"] == "hold" for r in rows if r["product"] == "housing")
    held = [r for r in rows if r["status"] == "hold"]
    assert held and all(r["product"] == "cover" and r["hold_reason"] == "lighting changed" for r in held)
    bands = json.loads((out / "station.json").read_text())["lanes"]
    assert {f"{cam} [housing]", f"{cam} [cover]"} <= set(bands)
    assert bands[f"{cam} [housing]"] != bands[f"{cam} [cover]"]

    from diffinspect.station.app import Station

    state = Station(out).state()  # the last frames were cover's: the page shows its health and its bands
    assert len(state["health"]) == 100 and state["bands"] == bands[f"{cam} [cover]"]
    assert state["histogram"]["product"] == "cover"


# -- the command line ----------------------------------------------------------------------------------


def test_cli_watch_routes_by_camera_folder_and_sub_folder(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from diffinspect.cli import app
    from diffinspect.scoring.inspector import Inspector

    monkeypatch.setattr(Inspector, "load", classmethod(lambda cls, b, *a, **k: cls(FakeDetector(name=Path(b).name))))
    monkeypatch.setattr(Inspector, "fallback", classmethod(lambda cls, b, *a, **k: cls(FakeDetector(name="copod"))))
    monkeypatch.chdir(tmp_path)
    for name in ("housing", "cover"):
        Path(f"models/{name}").mkdir(parents=True)
        Path(f"models/{name}/manifest.json").write_text(FAKE_MANIFEST)
    Path("inspect.toml").write_text('[watch.products]\nhousing = "models/housing"\ncover = "models/cover"\n'
                                    '[watch.cameras]\n"cam2" = "cover"\n')
    for folder in ("cam1/housing", "cam1/cover", "cam1/lid", "cam2"):
        Path(folder).mkdir(parents=True)
        for i in range(3):
            write_frame(Path(folder) / f"f{i}.png", 20 * i + 10)
    write_frame(Path("cam1/loose.png"), 10)  # no product named anywhere
    res = CliRunner().invoke(app, ["watch", "cam1", "cam2", "--once", "--quiet", "--out", "res"])
    assert res.exit_code == 0, res.output
    got = {(Path(r["path"]).parent.name, r["product"], r["detector"], r["status"], r["hold_reason"])
           for r in db_rows(Path("res"))}
    assert got == {("housing", "housing", "housing", "ok", None), ("cover", "cover", "cover", "ok", None),
                   ("lid", "lid", None, "hold", "unknown product lid"), ("cam2", "cover", "cover", "ok", None),
                   ("cam1", None, None, "hold", "no product selected")}
    assert "product cover: ok 6, ng 0, hold 0, error 0" in " ".join(res.output.split())
    mirrored = {r["path"]: r["product"] for r in jsonl_rows(Path("res"))}
    assert mirrored == {r["path"]: r["product"] for r in db_rows(Path("res"))} and len(mirrored) == 13

    # `inspect score` takes a product's name for its bundle, and says the product in each JSON line.
    res = CliRunner().invoke(app, ["score", "cover", "cam2/f1.png", "--json"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.splitlines()[-1])
    assert (line["product"], line["detector"], line["label"]) == ("cover", "cover", "ok")

    Path("inspect.toml").write_text('[watch.products]\nhousing = "models/nothing"\n')
    res = CliRunner().invoke(app, ["watch", "cam1", "--once", "--quiet", "--out", "res"])
    assert isinstance(res.exception, DiffinspectError)  # main() prints it in one line, exit code 2
    assert str(res.exception) == "no model bundle at models/nothing (watch.products.housing in ./inspect.toml)"

