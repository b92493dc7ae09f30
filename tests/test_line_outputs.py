"""Outputs of the line: every committed row reaches a real Mosquitto broker and a real OPC UA server, in
order, none lost, through outages, restarts, kill -9 and refused credentials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from line_receivers import MOSQUITTO, Broker, PlcServer, Subscriber, check_delivery, frame_row, wait_for
from services import missing, needs
from watch_fakes import db_rows, n_rows, write_frame

from diffinspect import DiffinspectError
from diffinspect.config import MqttConfig, OpcuaConfig, OpcuaNodes, load_outputs
from diffinspect.outputs.outbox import Outbox, OutputError, pending
from diffinspect.store.results import ResultStore

needs_mosquitto = needs(MOSQUITTO is not None, "Debian's mosquitto (apt-get install mosquitto)")
RECEIVERS = Path(__file__).with_name("line_receivers.py")
OUTAGE_S = float(os.environ.get("DIFFINSPECT_TEST_OUTAGE_S", "10"))

# What `inspect watch` takes for a bundle (the detectors themselves are faked in these tests).
FAKE_MANIFEST = '{"schema_version": 1, "diffinspect_version": "0", "files": {}}'


class Warnings(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def mqtt(broker: Broker, **kw: object):  # noqa: ANN201
    from diffinspect.outputs.mqtt import MqttOutput

    return MqttOutput(MqttConfig(**{"url": broker.url, "station": "st1", **kw}))


def commit(store: ResultStore, box: Outbox | None, rows: list) -> list[int]:
    ids = [r.id for r in store.commit(rows)]
    if box is not None:
        box.wake()
    return ids


@pytest.fixture
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        missing("Debian's mosquitto (apt-get install mosquitto)")
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


# -- the outbox alone (no receiver needed) -----------------------------------------------------------


class FlakyOutput:
    """Refuses its first sends, then acknowledges; records what it acknowledged."""

    name, streams, acknowledged_rows = "flaky", ("frames", "events"), 0

    def __init__(self, fail_sends: int) -> None:
        self.fail_sends = fail_sends
        self.got: list[tuple[str, int]] = []
        self.opens = 0

    def open(self) -> None:
        self.opens += 1

    def send(self, stream: str, row: dict) -> None:
        if self.fail_sends > 0:
            self.fail_sends -= 1
            raise OutputError("receiver down (fake)")
        self.got.append((stream, row["id"]))

    def close(self) -> None:
        pass


def test_outbox_retries_in_order_and_says_a_failure_once(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    out, warn = FlakyOutput(fail_sends=3), Warnings()
    box = Outbox(store.db_path, [out], warn, backoff_s=(0.01, 0.05)).start()
    ids = commit(store, box, [frame_row(i) for i in range(20)])
    wait_for(lambda: len(out.got) == 20, what="20 acknowledged rows")
    box.stop()
    assert out.got == [("frames", i) for i in ids]
    assert out.opens == 4  # reconnected after each failure
    assert len(warn) == 2 and "receiver down" in warn[0] and "results wait in results.db" in warn[0]
    assert "delivering again (20 row(s) were waiting)" in warn[1]
    assert pending(store.db_path, "flaky") == 0
    store.close()


def test_outbox_starts_a_new_output_at_the_rows_from_now_on_and_keeps_its_mark(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out")
    commit(store, None, [frame_row(i) for i in range(5)])  # history before the output existed
    out = FlakyOutput(0)
    with Outbox(store.db_path, [out], Warnings()) as box:
        new = commit(store, box, [frame_row(i) for i in range(5, 8)])
        wait_for(lambda: len(out.got) == 3)
    later = commit(store, None, [frame_row(i) for i in range(8, 10)])  # committed while no outbox runs
    out2 = FlakyOutput(0)
    with Outbox(store.db_path, [out2], Warnings()):
        wait_for(lambda: len(out2.got) == 2)
    store.close()
    assert [i for _, i in out.got] == new and [i for _, i in out2.got] == later


def test_events_are_delivered_once_the_station_has_an_events_table(tmp_path: Path) -> None:
    """A results.db from before the events table: frames go out, and events too once the table appears."""
    store = ResultStore(tmp_path / "out")
    old = sqlite3.connect(store.db_path, isolation_level=None)
    old.execute("DROP TABLE events")
    old.close()
    out = FlakyOutput(0)
    box = Outbox(store.db_path, [out], Warnings(), poll_s=0.05).start()
    commit(store, box, [frame_row(0)])
    wait_for(lambda: len(out.got) == 1)
    db = sqlite3.connect(store.db_path, isolation_level=None)
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at REAL, kind TEXT, name TEXT, state TEXT, detail TEXT)")
    db.execute("INSERT INTO events (at, kind, name, state, detail) VALUES (1.0, 'score', 'drift', 'raised', 'x')")
    db.close()
    wait_for(lambda: ("events", 1) in out.got, what="the event")
    assert out.got == [("frames", 1), ("events", 1)]
    box.stop()
    store.close()


def test_outbox_follows_results_db_written_again_after_it_was_deleted(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "out", warn=lambda _: None)
    out = FlakyOutput(0)
    box = Outbox(store.db_path, [out], Warnings()).start()
    first = commit(store, box, [frame_row(i) for i in range(5)])
    wait_for(lambda: len(out.got) == 5)
    store.db_path.unlink()  # an operator cleaning up under a running watcher
    later = commit(store, box, [frame_row(i) for i in range(5, 10)])  # the store writes the file again
    wait_for(lambda: len(out.got) >= 10, what="the rows committed after the database came back")
    db = sqlite3.connect(store.db_path)  # a checkpoint moves the log into the file as it is now
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    later += commit(store, box, [frame_row(i) for i in range(10, 15)])
    wait_for(lambda: len(out.got) >= 15, what="the rows after the checkpoint")
    box.stop()
    store.close()
    assert [i for _, i in out.got] == first + later


# -- configuration ---------------------------------------------------------------------------------


def test_output_config_is_validated_and_flags_override_the_file() -> None:
    assert load_outputs({}) == (None, None)
    mqtt_cfg, opcua_cfg = load_outputs({"mqtt": {"url": "mqtt://a:1", "qos": 2, "topic": "x/{camera}"}},
                                       mqtt_url="mqtts://b:8883")
    assert mqtt_cfg.url == "mqtts://b:8883" and mqtt_cfg.qos == 2 and opcua_cfg is None
    _, opcua_cfg = load_outputs({"opcua": {"url": "opc.tcp://plc:4840", "nodes": {"counter": "ns=2;i=5"}}})
    assert opcua_cfg.nodes.counter == "ns=2;i=5"
    bad = [({"mqtt": {"url": "mqtt://a", "colour": 1}}, "unknown config key: watch.mqtt.colour"),
           ({"mqtt": {"url": "http://a"}}, "mqtt://host"),
           ({"mqtt": {"url": "mqtt://a", "qos": 0}}, "qos must be 1 or 2"),
           ({"mqtt": {"url": "mqtt://a", "topic": "a/{line}"}}, "only use {station} and {camera}"),
           ({"mqtt": {"url": "mqtt://a", "topic": "a/#"}}, "not a topic"),
           ({"mqtt": {"url": "mqtt://a", "ca_file": "/nonexistent.pem"}}, "file not found"),
           ({"opcua": {"url": "opc.tcp://plc:4840"}}, "nodes.counter"),
           ({"opcua": {"url": "opc.tcp://plc:4840", "nodes": {"counter": "x", "flag": "y"}}}, "nodes.flag"),
           ({"opcua": {"url": "http://plc"}}, "opc.tcp://")]
    for table, message in bad:
        with pytest.raises(DiffinspectError, match=message.replace("{", r"\{").replace("}", r"\}")):
            load_outputs(table)


# -- MQTT against Mosquitto ------------------------------------------------------------------------


@needs_mosquitto
def test_mqtt_one_message_per_row_with_station_status(tmp_path: Path, broker: Broker) -> None:
    sub = Subscriber(broker)
    store = ResultStore(tmp_path / "out")
    out = mqtt(broker)
    box = Outbox(store.db_path, [out], Warnings()).start()
    ids = commit(store, box, [frame_row(i) for i in range(10)])
    ids += commit(store, box, [frame_row(10, fallback=True), frame_row(11, "/line/cam2", status="error")])
    wait_for(lambda: len(sub.verdicts()) == 12, what="12 verdicts")
    box.stop()
    wait_for(lambda: sub.statuses()[-1:] == ["offline"], what="offline on a clean stop")
    got = sub.verdicts()
    rows = {r["id"]: r for r in db_rows(tmp_path / "out")}
    assert [m["id"] for m in got] == ids
    for m in got:
        assert {k: v for k, v in m.items() if k not in ("station", "camera")} == rows[m["id"]]
    assert got[-1]["camera"] == "cam2" and got[0]["station"] == "st1"
    topics = [t for t, _, _ in sub.messages if t.endswith("/verdict")]
    assert topics[0] == "diffinspect/st1/cam1/verdict" and topics[-1] == "diffinspect/st1/cam2/verdict"
    assert sub.statuses() == ["online", "fallback", "online", "offline"]
    assert out.acknowledged_rows == 12 and out.acknowledged == 12 + 4  # and 4 status messages
    sub.close()
    late = Subscriber(broker)  # the status is retained: a dashboard starting later sees it
    wait_for(lambda: late.statuses() == ["offline"], what="the retained status")
    late.close()
    store.close()


@needs_mosquitto
def test_mqtt_status_says_which_cameras_are_held_and_when_the_disk_is_low(tmp_path: Path, broker: Broker) -> None:
    """The retained status carries the hold state per camera (from the verdicts) and the open alarms, low
    disk among them (from the events), and is published again only when what it says changes."""
    from dataclasses import replace

    sub = Subscriber(broker)
    store = ResultStore(tmp_path / "out")
    box = Outbox(store.db_path, [mqtt(broker)], Warnings()).start()

    def said() -> dict:
        got = sub.on("/status")
        return json.loads(got[-1]) if got else {}

    def event(state: str, detail: str) -> None:
        store.add_events([(time.time(), "disk", "disk space low", state, detail, None)])
        box.wake()

    commit(store, box, [frame_row(0), replace(frame_row(1, "/line/cam2", "hold"), hold_reason="lighting changed")])
    wait_for(lambda: said().get("hold") == {"cam2": "lighting changed"}, what="cam2 held")
    assert said()["status"] == "online" and said()["alarms"] == [] and said()["low_disk"] is None
    event("raised", "0.4 GB free in /out, below min_free_gb (1 GB): overlays and moving frames paused")
    wait_for(lambda: said().get("low_disk") is not None, what="low disk")
    assert "overlays and moving frames paused" in said()["low_disk"] and said()["hold"] == {"cam2": "lighting changed"}
    assert [(a["kind"], a["name"]) for a in said()["alarms"]] == [("disk", "disk space low")]
    n = len(sub.on("/status"))
    commit(store, box, [frame_row(2), frame_row(3, "/line/cam2", "error")])  # says nothing new of cam2
    commit(store, box, [frame_row(4, "/line/cam2")])  # cam2's verdicts are not held any more
    wait_for(lambda: said().get("hold") == {}, what="cam2 released")
    assert len(sub.on("/status")) == n + 1  # one message: the frames between changed nothing
    event("cleared", "1.6 GB free in /out again: overlays and moving frames resumed")
    wait_for(lambda: said().get("low_disk", "") is None and said()["alarms"] == [], what="disk space back")
    box.stop()
    wait_for(lambda: sub.statuses()[-1:] == ["offline"], what="offline on a clean stop")
    sub.close()
    store.close()


@needs_mosquitto
@needs(shutil.which("openssl") is not None, "openssl, to make test certificates (apt-get install openssl)")
def test_mqtt_over_tls_checks_the_broker_certificate(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", tls=True).start()
    try:
        sub = Subscriber(broker)
        store = ResultStore(tmp_path / "out")
        url = f"mqtts://127.0.0.1:{broker.tls_port}"
        warn = Warnings()
        untrusted = mqtt(broker, url=url, ca_file=None)  # the system's CAs do not know the test CA
        with pytest.raises(OutputError, match="TLS handshake with the MQTT broker 127.0.0.1.* failed"):
            untrusted.open()
        with Outbox(store.db_path, [mqtt(broker, url=url, ca_file=str(broker.ca_file))], warn) as box:
            ids = commit(store, box, [frame_row(i) for i in range(5)])
            wait_for(lambda: len(sub.verdicts()) == 5, what="verdicts over TLS")
        assert [m["id"] for m in sub.verdicts()] == ids and warn == []
        plain = mqtt(broker, url=f"mqtt://127.0.0.1:{broker.tls_port}")  # plain MQTT to the TLS port
        with pytest.raises(OutputError, match="closed the connection before answering.*use mqtts://"):
            plain.open()
        sub.close()
        store.close()
        # Files that cannot serve are refused when the output is configured, in one line naming them.
        (tmp_path / "junk.pem").write_text("not a certificate")
        with pytest.raises(DiffinspectError, match="ca_file .*junk.pem is not a PEM CA certificate"):
            load_outputs({"mqtt": {"url": url, "ca_file": str(tmp_path / "junk.pem")}})
        pem = {"url": url, "ca_file": str(broker.ca_file), "cert_file": str(broker.root / "server.pem")}
        with pytest.raises(DiffinspectError, match="not a PEM certificate with its matching key"):
            load_outputs({"mqtt": {**pem, "key_file": str(broker.root / "ca.key")}})  # the CA's key, not the cert's
        assert load_outputs({"mqtt": {**pem, "key_file": str(broker.root / "server.key")}})[0] is not None
    finally:
        broker.stop()


@needs_mosquitto
@pytest.mark.slow
def test_broker_down_while_200_frames_arrive(tmp_path: Path, broker: Broker) -> None:
    """The broker is down for OUTAGE_S (10 s in CI; DIFFINSPECT_TEST_OUTAGE_S=30 for the issue's 30 s:
    the same code path, reconnecting with back-off) while 200 frames are committed at a steady pace."""
    sub = Subscriber(broker)
    store = ResultStore(tmp_path / "out")
    warn = Warnings()
    box = Outbox(store.db_path, [mqtt(broker)], warn, backoff_s=(0.2, 5.0)).start()
    ids = commit(store, box, [frame_row(i) for i in range(20)])
    wait_for(lambda: len(sub.verdicts()) == 20)
    broker.stop()
    t0 = time.monotonic()
    for i in range(20, 220):  # 200 frames over the outage: the commits never wait for the broker
        ids += commit(store, box, [frame_row(i)])
        time.sleep(max(0.0, t0 + (i - 19) * OUTAGE_S / 200 - time.monotonic()))
    assert pending(store.db_path, "mqtt") >= 199  # the backlog waits in SQLite
    broker.start()
    wait_for(lambda: len(sub.verdicts()) >= 220, timeout=30, what="the backlog")
    box.stop()
    counts = check_delivery([m["id"] for m in sub.verdicts()], ids, max_duplicates=1)
    print(f"broker down {OUTAGE_S:g} s: {counts}")
    assert counts["lost"] == 0 and counts["rows"] == 220
    assert sum("cannot reach the MQTT broker" in w for w in warn) == 1
    sub.close()
    store.close()


@needs_mosquitto
@pytest.mark.slow
def test_watcher_killed_9_mid_backlog_resends_at_most_the_message_in_flight(tmp_path: Path, broker: Broker) -> None:
    """300 frames waiting; the watcher (scoring and publishing) killed with -9 three times on the way."""
    sub = Subscriber(broker)
    cam, out = tmp_path / "cam1", tmp_path / "out"
    cam.mkdir()
    for i in range(300):
        write_frame(cam / f"f{i:04d}.png", 40 + i % 120)
    old = time.time() - 60
    for f in cam.iterdir():
        os.utime(f, (old, old))  # complete frames, the backlog of a station that was off

    def watcher() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(RECEIVERS), str(out), str(cam), broker.url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    kills = 0
    for _ in range(3):
        n = len(sub.verdicts())
        proc = watcher()
        wait_for(lambda n=n: len(sub.verdicts()) >= n + 40, timeout=30, what="some deliveries")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert n_rows(out) < 300 or pending(out / "results.db", "mqtt") > 0  # killed mid-backlog
        wait_for(lambda: sub.statuses()[-1:] == ["offline"], what="the last will")
    proc = watcher()
    try:
        wait_for(lambda: n_rows(out) == 300 and pending(out / "results.db", "mqtt") == 0, timeout=30,
                 what="every frame scored and delivered")
        wait_for(lambda: len({m["id"] for m in sub.verdicts()}) == 300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ids = [r["id"] for r in db_rows(out)]
    counts = check_delivery([m["id"] for m in sub.verdicts()], ids, max_duplicates=kills)
    print(f"kill -9 x{kills}: {counts}")
    assert counts["lost"] == 0 and len(ids) == 300
    sub.close()


@needs_mosquitto
def test_wrong_credentials_one_clear_error_and_the_backlog_is_kept(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", users={"station": "right"}).start()
    try:
        sub = Subscriber(broker, username="station", password="right")
        store = ResultStore(tmp_path / "out")
        warn = Warnings()
        box = Outbox(store.db_path, [mqtt(broker, username="station", password="wrong")], warn,
                     backoff_s=(0.05, 0.1)).start()
        ids = commit(store, box, [frame_row(i) for i in range(30)])  # scoring goes on
        wait_for(lambda: len(warn) >= 1)
        time.sleep(0.5)  # several more attempts
        box.stop()
        assert len(warn) == 1, warn
        assert "refused the connection" in warn[0] and "check username and password" in warn[0]
        assert pending(store.db_path, "mqtt") == 30 and sub.verdicts() == []
        with Outbox(store.db_path, [mqtt(broker, username="station", password="right")], Warnings()):
            wait_for(lambda: len(sub.verdicts()) == 30, what="the kept backlog")
        assert [m["id"] for m in sub.verdicts()] == ids
        sub.close()
        store.close()
    finally:
        broker.stop()


# -- OPC UA against asyncua's server ---------------------------------------------------------------


def _record_counter_writes(plc: PlcServer, seen: list[tuple[bool, float, int]]) -> None:
    from asyncua.common.callback import CallbackType

    def on_write(event, dispatcher) -> None:  # noqa: ANN001
        vals = {str(w.NodeId.Identifier): w.Value.Value.Value for w in event.request_params.NodesToWrite}
        if "Vision.Counter" in vals:
            seen.append((vals["Vision.Reject"], vals["Vision.Score"], vals["Vision.Counter"]))

    plc._server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, on_write)


@pytest.mark.slow
def test_plc_gets_every_verdict_through_a_server_restart(tmp_path: Path) -> None:
    pytest.importorskip("asyncua")
    from diffinspect.outputs.opcua import OpcuaOutput

    plc = PlcServer().start()
    seen: list[tuple[bool, float, int]] = []
    _record_counter_writes(plc, seen)
    store = ResultStore(tmp_path / "out")
    warn = Warnings()
    out = OpcuaOutput(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(**plc.node_ids()), timeout_s=2))
    box = Outbox(store.db_path, [out], warn, backoff_s=(0.1, 0.5)).start()
    rows = [frame_row(i) for i in range(20)]
    ids = commit(store, box, rows)
    wait_for(lambda: len(seen) == 20, what="20 writes")
    plc.stop()
    rows2 = [frame_row(i, status="error" if i == 25 else None) for i in range(20, 40)]
    ids += commit(store, box, rows2)
    time.sleep(1.0)
    plc2 = PlcServer(port=plc.port).start()  # the PLC back, its tags at their defaults
    _record_counter_writes(plc2, seen)
    try:
        wait_for(lambda: box.states()[0].last_id == ids[-1], timeout=30, what="the backlog to reach the PLC")
        reject, score, counter = plc2.values()
    finally:
        box.stop()
        plc2.stop()
        store.close()
    counts = check_delivery([c for _, _, c in seen], ids, max_duplicates=1)
    print(f"PLC restart: {counts}")
    assert counts["lost"] == 0 and counter == ids[-1]
    by_id = {c: (r, s) for r, s, c in seen}
    for row in rows + rows2:
        reject_flag, value = by_id[row.id]
        assert reject_flag == (row.status != "ok")
        assert value == pytest.approx(row.score, rel=1e-6) if row.score is not None else value != value
    assert any("OPC UA server" in w for w in warn)


def test_plc_node_of_the_wrong_type_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("asyncua")
    from diffinspect.outputs.opcua import OpcuaOutput

    plc = PlcServer().start()
    try:
        nodes = plc.node_ids()
        out = OpcuaOutput(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(counter=nodes["score"]), timeout_s=2))
        with pytest.raises(OutputError, match="is Float; it must be an integer type"):
            out.open()
        out = OpcuaOutput(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(counter="ns=2;s=Nowhere"), timeout_s=2))
        with pytest.raises(OutputError, match="BadNodeIdUnknown"):
            out.open()
    finally:
        plc.stop()



# -- inside `inspect watch` ------------------------------------------------------------------------


@needs_mosquitto
def test_watch_publishes_every_row_and_delivers_the_last_before_returning(tmp_path: Path, broker: Broker) -> None:
    from watch_fakes import Factory

    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.outputs.mqtt import MqttOutput

    sub = Subscriber(broker)
    cam = tmp_path / "cam1"
    cam.mkdir()
    for i in range(40):
        write_frame(cam / f"f{i:03d}.png", 30 + 3 * i)
    (cam / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a frame")
    out = MqttOutput(MqttConfig(url=broker.url, station="st1"))
    summary = run_watch([cam], tmp_path / "out", Factory(), Factory(name="copod"),
                        WatchOptions(once=True, quiet=True, stable_ms=20, settle_ms=50, overlays="none"),
                        outputs=[out])
    rows = db_rows(tmp_path / "out")
    assert summary.frames == 41 and pending(tmp_path / "out" / "results.db", "mqtt") == 0
    wait_for(lambda: len(sub.verdicts()) == 41)
    assert [(m["id"], m["status"], m["score"]) for m in sub.verdicts()] == [
        (r["id"], r["status"], r["score"]) for r in rows]
    assert sum(m["status"] == "error" for m in sub.verdicts()) == 1
    sub.close()


def test_cli_refuses_a_bad_output_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "manifest.json").write_text(FAKE_MANIFEST)
    (tmp_path / "cam").mkdir()
    (tmp_path / "inspect.toml").write_text('[watch.mqtt]\nurl = "mqtt://broker"\nqos = 0\n')
    res = subprocess.run([sys.executable, "-m", "diffinspect", "watch", "cam", "--model", "model", "--once"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "qos must be 1 or 2" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "diffinspect", "watch", "cam", "--model", "model", "--once",
                          "--mqtt", "http://broker"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "mqtt://host:1883" in res.stderr + res.stdout


@needs_mosquitto
def test_watch_with_refused_credentials_scores_everything_and_says_so_once(tmp_path: Path, caplog) -> None:
    from watch_fakes import Factory

    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.outputs.mqtt import MqttOutput

    broker = Broker(tmp_path / "broker", users={"station": "right"}).start()
    try:
        cam = tmp_path / "cam1"
        cam.mkdir()
        for i in range(20):
            write_frame(cam / f"f{i:03d}.png", 30 + 5 * i)
        out = MqttOutput(MqttConfig(url=broker.url, station="st1", username="station", password="wrong"))
        summary = run_watch([cam], tmp_path / "out", Factory(), Factory(name="copod"),
                            WatchOptions(once=True, quiet=True, stable_ms=20, overlays="none"), outputs=[out])
    finally:
        broker.stop()
    assert summary.frames == 20 and pending(tmp_path / "out" / "results.db", "mqtt") == 20
    said = [m for m in caplog.messages if "mqtt:" in m]
    assert len(said) == 1 and "refused the connection" in said[0] and "results wait in results.db" in said[0]


@needs_mosquitto
def test_mqtt_events_go_to_the_event_topic(tmp_path: Path, broker: Broker) -> None:
    sub = Subscriber(broker)
    store = ResultStore(tmp_path / "out")
    with Outbox(store.db_path, [mqtt(broker)], Warnings(), poll_s=0.05):
        store.add_events([(1.5, "lighting", "lighting changed", "raised", "brightness -30%", "/line/cam1")])
        wait_for(lambda: len(sub.on("/event")) == 1, what="the event")
    store.close()
    topic = [t for t, _, _ in sub.messages if t.endswith("/event")][0]
    assert topic == "diffinspect/st1/event"
    assert json.loads(sub.on("/event")[0]) == {"id": 1, "at": 1.5, "kind": "lighting", "name": "lighting changed",
                                               "state": "raised", "detail": "brightness -30%",
                                               "folder": "/line/cam1"}
    sub.close()


@needs_mosquitto
def test_cli_watch_mqtt_flag_publishes_and_reports(tmp_path: Path, broker: Broker, monkeypatch) -> None:
    from typer.testing import CliRunner
    from watch_fakes import FakeDetector

    import diffinspect.scoring.loader as loader
    from diffinspect.cli import app

    monkeypatch.setattr(loader, "load_detector", lambda *a, **k: FakeDetector())
    monkeypatch.setattr(loader, "load_fallback", lambda *a, **k: FakeDetector(name="copod"))
    monkeypatch.chdir(tmp_path)
    Path("model").mkdir()
    Path("model/manifest.json").write_text(FAKE_MANIFEST)
    Path("inspect.toml").write_text('[watch.mqtt]\nstation = "press-4"\ntopic = "plant/{station}/{camera}/verdict"\n')
    Path("cam7").mkdir()
    for i in range(6):
        write_frame(Path("cam7") / f"f{i}.png", 20 * i + 10)
    sub = Subscriber(broker, topic="plant/#")
    res = CliRunner().invoke(app, ["watch", "cam7", "--model", "model", "--once", "--quiet", "--out", "res",
                                   "--mqtt", broker.url])
    assert res.exit_code == 0, res.output
    assert "mqtt: 6 verdict(s) acknowledged in this run; 0 waiting" in " ".join(res.output.split())
    wait_for(lambda: len(sub.verdicts()) == 6)
    assert {t for t, _, _ in sub.messages if t.endswith("/verdict")} == {"plant/press-4/cam7/verdict"}
    sub.close()


def test_console_prints_bracketed_text_as_it_is(capsys) -> None:
    """A receiver's error (or a file name) with brackets is printed, not read as rich markup, by the handler
    the CLI shows the watcher's records with."""
    import logging

    from rich.console import Console

    from diffinspect.logs import ROOT, show_on

    logger = logging.getLogger(ROOT)
    saved = logger.handlers[:], logger.level
    try:
        show_on(Console(stderr=True))
        logging.getLogger("diffinspect.outputs.outbox").warning("opcua: refused [/x] by [bold]PLC[/bold]")
        logging.getLogger("diffinspect.line.watch").info("mqtt: delivering again [diffinspect[opcua]]")
    finally:
        logger.handlers[:], logger.level = saved
    err = capsys.readouterr().err
    assert "warning: opcua: refused [/x] by [bold]PLC[/bold]" in err and "[diffinspect[opcua]]" in err
