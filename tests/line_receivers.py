"""Real receivers for the output tests: Debian's Mosquitto on a free loopback port, a subscriber that
records what arrives, and asyncua's OPC UA server standing in for the PLC."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Broker:
    """Mosquitto with persistence, so a subscriber's queued messages survive the broker's restart."""

    def __init__(self, root: Path, users: dict[str, str] | None = None, tls: bool = False) -> None:
        assert MOSQUITTO is not None
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {root}/",
                 "max_queued_messages 100000", "log_dest none"]
        if os.geteuid() == 0:  # as root mosquitto drops to its own user, which cannot read the test's folders
            lines.append("user root")
        if users:
            pw = root / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            os.chmod(pw, 0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if tls:  # a second listener with TLS (the subscriber stays on the plain one)
            self.ca_file = make_certificates(root)
            self.tls_port = free_port()
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.ca_file}",
                      f"certfile {root / 'server.pem'}", f"keyfile {root / 'server.key'}"]
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_for(self._listening, 10, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves the persistence file
            self.proc.wait(10)
        self.proc = None

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False


def make_certificates(root: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl); returns the CA file."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return root / "ca.pem"


class Subscriber:
    """Records every message on a topic filter, with a persistent session (QoS 1) so that what is
    published while it reconnects is queued for it by the broker."""

    def __init__(self, broker: Broker, topic: str = "diffinspect/#", username: str | None = None,
                 password: str | None = None, qos: int = 1) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []  # (topic, payload, retained)
        self.qos: list[int] = []  # each message's QoS as delivered: the lower of the publisher's and ours
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{id(self)}",
                                  clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=qos)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "the subscriber to connect")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            # The broker's own at-least-once redelivery to this subscriber (DUP set, after a restart that
            # lost our PUBACKs) of a message already recorded says nothing about the station: drop it.
            # A station re-send is a new publish, which the broker forwards without DUP.
            if msg.dup and (msg.topic, msg.payload, bool(msg.retain)) in self.messages:
                return
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.qos.append(msg.qos)

    def verdicts(self) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/verdict")]

    def on(self, suffix: str) -> list[str]:
        with self._lock:
            return [p.decode() for t, p, _ in self.messages if t.endswith(suffix)]

    def statuses(self) -> list[str]:
        """The "status" of each retained status message received (online, fallback, offline)."""
        return [json.loads(p)["status"] for p in self.on("/status")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class LineController:
    """The line's side of a changeover: publishes the product to a station's command topic, retained, so a
    station that starts later takes it too. Called with the product's name."""

    def __init__(self, broker: Broker, station: str = "st1") -> None:
        import paho.mqtt.client as mqtt

        self.topic = f"diffinspect/{station}/product"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"line-controller-{id(self)}")
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def __call__(self, product: str) -> None:
        self.client.publish(self.topic, product, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_delivery(received: list[int], expected: list[int], max_duplicates: int) -> dict[str, int]:
    """In order, none missing; a duplicate may only repeat the id just before it (a re-send)."""
    dups = [b for a, b in zip(received, received[1:], strict=False) if b <= a]
    deduped = [received[0]] + [b for a, b in zip(received, received[1:], strict=False) if b > a] if received else []
    if deduped != expected:  # say where the order broke, so a rare failure can be diagnosed from the log
        at = next((i for i, (a, b) in enumerate(zip(deduped, expected, strict=False)) if a != b),
                  min(len(deduped), len(expected)))
        raise AssertionError(f"lost or out of order: missing {sorted(set(expected) - set(received))[:10]}; "
                             f"received around the break {deduped[max(0, at - 3):at + 4]}, expected "
                             f"{expected[max(0, at - 3):at + 4]}; full sequence {received}")
    for i in range(1, len(received)):
        if received[i] <= received[i - 1]:
            assert received[i] == received[i - 1], f"a duplicate that is not a re-send: {received[i - 2:i + 2]}"
    assert len(dups) <= max_duplicates, f"{len(dups)} duplicates: {dups}"
    return {"sent": len(received), "rows": len(expected), "duplicates": len(dups),
            "lost": len(set(expected) - set(received))}


class PlcServer:
    """asyncua's server with the nodes a PLC program would give the vision station, in its own thread;
    restartable on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"opc.tcp://127.0.0.1:{self.port}/plc/"
        self.writes: list[tuple[bool, float, int]] = []  # (reject, score, counter) when the counter moved
        self._server = None
        self._tloop = None

    def start(self) -> PlcServer:
        from asyncua import ua
        from asyncua.sync import Server, ThreadLoop

        self._tloop = ThreadLoop()
        self._tloop.start()
        server = Server(tloop=self._tloop)
        server.set_endpoint(self.url)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = server.register_namespace("urn:test:plc")
        vision = server.nodes.objects.add_object(idx, "Vision")
        self.reject = vision.add_variable(ua.NodeId("Vision.Reject", idx), "Reject", False, ua.VariantType.Boolean)
        self.score = vision.add_variable(ua.NodeId("Vision.Score", idx), "Score", 0.0, ua.VariantType.Float)
        self.counter = vision.add_variable(ua.NodeId("Vision.Counter", idx), "Counter", 0, ua.VariantType.UInt32)
        # What the PLC program sets at a product changeover (the station reads it: [watch.products]).
        self.product = vision.add_variable(ua.NodeId("Vision.Product", idx), "Product", "", ua.VariantType.String)
        for var in (self.reject, self.score, self.counter):
            var.set_writable()
        self.ns = idx
        server.start()
        self._server = server
        return self

    def node_ids(self) -> dict[str, str]:
        return {k: f"ns={self.ns};s=Vision.{k.capitalize()}" for k in ("reject", "score", "counter")}

    def values(self) -> tuple[bool, float, int]:
        return self.reject.read_value(), self.score.read_value(), self.counter.read_value()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._tloop is not None:
            self._tloop.stop()
            self._tloop = None


def frame_row(i: int, folder: str = "/line/cam1", status: str | None = None, fallback: bool = False):  # noqa: ANN201
    """A row as the watcher writes it (frame i of a camera)."""
    from diffinspect.scoring.record import Record

    now = time.time()
    status = status or ("ng" if i % 7 == 0 else "ok")
    return Record(path=f"{folder}/f{i:05d}.png", folder=folder, size=100 + i, mtime=now, mtime_ns=i,
                    status=status, score=None if status == "error" else i / 10,
                    threshold=None if status == "error" else 0.5, detector="copod" if fallback else "diffusion",
                    backend="fake", latency_ms=1.0, overlay=None, error="cannot decode" if status == "error" else None,
                    fallback_reason="backend failed (fake)" if fallback else None, received_at=now, scored_at=now)


def main(argv: list[str]) -> None:
    """`python tests/line_receivers.py OUT CAMERA_FOLDER BROKER_URL`: `inspect watch` with fake detectors
    (20 ms per batch of 8, so a backlog takes a while) and an MQTT output, until killed (the kill -9 test)."""
    from watch_fakes import Factory

    from diffinspect.config import MqttConfig
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.outputs.mqtt import MqttOutput

    out, cam, url = argv
    opts = WatchOptions(batch=8, quiet=True, stable_ms=50, overlays="none", rescan_seconds=0.5)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the per-frame lines)
    run_watch([Path(cam)], Path(out), Factory(cost_s=0.02), Factory(name="copod"), opts,
              outputs=[MqttOutput(MqttConfig(url=url, station="st1"))])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1:])
