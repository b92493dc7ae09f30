"""MQTT output of the outbox (paho-mqtt): one JSON message per frame, delivered when the broker acknowledged.

Topics (templates with {station} and {camera}, the camera being the watched folder's name):
  diffinspect/{station}/{camera}/verdict   one message per frame: the row of results.db, its id included
  diffinspect/{station}/event              the station's alarms, when results.db has an events table
  diffinspect/{station}/status             retained, one JSON object (status_message): "status" online |
                                           fallback | offline (offline is the last will, so a dead station
                                           or a cut cable reads offline too), the cameras whose verdicts are
                                           on hold and why, the open alarms, and low disk (overlays paused)
  diffinspect/{station}/product            read, retained: the product on the line ([watch.products]);
                                           ProductTopic subscribes to it on a connection of its own

A message counts as delivered on its PUBACK (QoS 1) or PUBCOMP (QoS 2), never when it is only queued.
The client does not reconnect by itself: the outbox reconnects with back-off and sends what is pending
again, so there is one place that decides what was delivered.
"""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diffinspect.config import MqttConfig
from diffinspect.outputs.outbox import OutputError

PASSWORD_ENV = "DIFFINSPECT_MQTT_PASSWORD"


def topic_part(text: str) -> str:
    """A name made safe as one topic level: no wildcards, no separators."""
    cleaned = "".join("_" if ch in "+#/\0" else ch for ch in text).strip()
    return cleaned or "_"


def station_of(cfg: MqttConfig) -> str:
    return topic_part(cfg.station or socket.gethostname())


def frame_message(row: dict, station: str) -> bytes:
    """The frame's row as stored, plus the station and camera, as one JSON object."""
    msg = {"id": row["id"], "station": station, "camera": Path(row.get("folder") or "").name}
    msg.update({k: _finite(v) for k, v in row.items() if k != "id"})
    return json.dumps(msg, separators=(",", ":")).encode()


def status_message(status: str, fallback_reason: str | None = None, hold: dict[str, str] | None = None,
                   alarms: list[dict] | None = None) -> bytes:
    """The retained status: how the station scores (online | fallback | offline, and why it falls back),
    which cameras' verdicts are on hold (on_alarm = "hold": parts go to manual check) and why, the open
    alarms (drift, and "disk space low"), and low_disk: while the disk is below retention's free-space
    floor, why (no overlays are written, no frame is moved; rows are still recorded)."""
    alarms = alarms or []
    low = next((a["detail"] or a["name"] for a in alarms if a["kind"] == "disk"), None)
    msg = {"status": status, "fallback_reason": fallback_reason, "hold": hold or {}, "alarms": alarms,
           "low_disk": low}
    return json.dumps(msg, separators=(",", ":")).encode()


OFFLINE = status_message("offline")


def _finite(v: object) -> object:
    # JSON has no NaN; a receiver's strict parser would reject the message.
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MqttOutput:
    streams = ("frames", "events")

    def __init__(self, cfg: MqttConfig, name: str = "mqtt") -> None:
        import paho.mqtt.client  # noqa: F401 (a clear ImportError at start-up, not in the thread)

        self.cfg, self.name = cfg, name
        url = urlsplit(cfg.url)
        self.host = url.hostname or "localhost"
        self.tls = cfg.tls or url.scheme in ("mqtts", "ssl")
        self.port = url.port or (8883 if self.tls else 1883)
        self.username = cfg.username or (unquote(url.username) if url.username else None)
        self.password = (os.environ.get(PASSWORD_ENV) or cfg.password
                         or (unquote(url.password) if url.password else None))
        self.station = station_of(cfg)
        self.client_id = cfg.client_id or f"diffinspect-{self.station}"
        self.status_topic = cfg.status_topic.format(station=self.station)
        self.event_topic = cfg.event_topic.format(station=self.station)
        self.where = f"MQTT broker {self.host}:{self.port}"
        self._client = None
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._connected = False
        self._connack: object | None = None
        # What the retained status says, from the rows and events delivered so far.
        self._fallback: str | None = None  # why the newest scored frame was scored by the fallback
        self._hold: dict[str, str] = {}  # camera -> why its verdicts are held
        self._alarms: dict[tuple[str, str | None], dict] = {}  # (kind, folder) -> the open alarm
        self._said: bytes | None = None
        self._versions: dict[str, int] = {}  # camera -> the bundle version last published for it
        self.acknowledged = 0  # messages acknowledged by the broker (frames, events and status)
        self.acknowledged_rows = 0

    # -- connection ------------------------------------------------------------------------------

    def open(self) -> None:
        import paho.mqtt.client as mqtt

        self.close()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             reconnect_on_failure=False)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            try:
                client.tls_set(ca_certs=self.cfg.ca_file, certfile=self.cfg.cert_file, keyfile=self.cfg.key_file,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise OutputError(f"TLS set-up for the {self.where} failed: {exc}") from None
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        with self._cond:
            self._connack, self._connected = None, False
            self._acked.clear()
        try:
            client.connect(self.host, self.port, keepalive=self.cfg.keepalive_s)
        except ssl.SSLError as exc:
            raise OutputError(f"TLS handshake with the {self.where} failed: {exc}") from None
        except OSError as exc:
            raise OutputError(f"cannot reach the {self.where} ({exc.strerror or exc})") from None
        client.loop_start()
        self._client = client
        deadline = time.monotonic() + self.cfg.ack_timeout_s
        with self._cond:
            while self._connack is None and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            connack = self._connack
        if connack is None or getattr(connack, "is_failure", True) or not self._connected:
            self.close(say_offline=False)
            if connack is None:
                raise OutputError(f"no answer from the {self.where} within {self.cfg.ack_timeout_s:g} s")
            if isinstance(connack, _Dropped):
                hint = ("check the CA and client certificate" if self.tls
                        else "is it a TLS port? then use mqtts://")
                raise OutputError(f"the {self.where} closed the connection before answering ({hint})")
            raise OutputError(f"the {self.where} refused the connection: {connack}"
                              + (" (check username and password)" if _is_auth(connack) else ""))
        # Up again: replace the last will's "offline" at once, not at the next frame.
        self._said = None
        self._say_status()
        self._versions.clear()  # said again on the next frame, in case the broker lost its retained messages

    def close(self, say_offline: bool = True) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if say_offline and self._connected:
                info = client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
                self._wait(info.mid, min(self.cfg.ack_timeout_s, 2.0))
            client.disconnect()  # a clean disconnect: the broker does not send the last will
        except Exception:  # noqa: S110 (closing a broken connection)
            pass
        finally:
            client.loop_stop()
            with self._cond:
                self._connected = False

    # -- sending -------------------------------------------------------------------------------

    def send(self, stream: str, row: dict) -> None:
        if stream == "events":
            self._publish(self.event_topic, json.dumps({k: _finite(v) for k, v in row.items()}).encode())
            key = (row.get("kind") or "", row.get("folder"))
            if row.get("state") == "raised":
                self._alarms[key] = {k: _finite(row.get(k)) for k in ("kind", "name", "folder", "detail", "at")}
            else:
                self._alarms.pop(key, None)
            self._say_status()
            return
        name = Path(row.get("folder") or "").name
        self._fallback = row.get("fallback_reason") if row.get("status") != "error" else None
        if row.get("status") == "hold":
            self._hold[name] = row.get("hold_reason") or "held"
        elif row.get("status") != "error":  # an unreadable frame is never held: it says nothing of the camera
            self._hold.pop(name, None)
        self._say_status()
        camera = topic_part(name)
        version = row.get("bundle_version")
        if version is not None and self._versions.get(camera) != version:  # a new version scores this camera
            self._publish(self.cfg.version_topic.format(station=self.station, camera=camera), str(version).encode(),
                          retain=True)
            self._versions[camera] = version
        self._publish(self.cfg.topic.format(station=self.station, camera=camera), frame_message(row, self.station))
        self.acknowledged_rows += 1

    def _say_status(self) -> None:
        """Publish the retained status when what it says changed."""
        said = status_message("fallback" if self._fallback else "online", self._fallback, dict(self._hold),
                              list(self._alarms.values()))
        if said != self._said:
            self._publish(self.status_topic, said, retain=True)
            self._said = said

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        client = self._client
        if client is None or not self._connected:
            raise OutputError(f"lost the connection to the {self.where}")
        info = client.publish(topic, payload, qos=self.cfg.qos, retain=retain)
        if info.rc != 0:
            raise OutputError(f"lost the connection to the {self.where} (publish: {info.rc})")
        if not self._wait(info.mid, self.cfg.ack_timeout_s):
            raise OutputError(f"lost the connection to the {self.where}" if not self._connected
                              else f"no acknowledgement from the {self.where} within {self.cfg.ack_timeout_s:g} s")

    def _wait(self, mid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._acked:
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected:
                    return False
                self._cond.wait(left)
            self._acked.discard(mid)
        self.acknowledged += 1
        return True

    # -- paho callbacks (its network thread) -----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        with self._cond:
            self._connack = reason_code
            self._connected = not reason_code.is_failure
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        with self._cond:
            self._connected = False
            if self._connack is None:  # closed before any CONNACK: not the broker's MQTT answer
                self._connack = _Dropped()
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()


class _Dropped:
    """The connection closed before the broker's CONNACK (e.g. plain MQTT to a TLS port)."""

    is_failure = True


def _is_auth(reason_code: object) -> bool:
    text = str(reason_code).lower()
    return "authori" in text or "password" in text or "credential" in text


class ProductTopic:
    """The retained command topic that names the product on the line (line/products.py ProductSource).

    A connection of its own (paho reconnects it and subscribes again), so the outbox's connection, which
    reconnects only to deliver, is left alone. The retained message found at the first subscription was in
    force before the start; any later one from its arrival on. An empty payload names no product."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig) -> None:
        import paho.mqtt.client as mqtt

        out = MqttOutput(cfg)  # the same broker, credentials and TLS as the verdicts
        self.topic = cfg.product_topic.format(station=out.station)
        self.where = out.where
        self.ready = threading.Event()
        self.product: str | None = None
        self._report = None
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{out.client_id}-product",
                                   clean_session=True)
        if out.username is not None:
            self._client.username_pw_set(out.username, out.password)
        if out.tls:
            self._client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                                 cert_reqs=ssl.CERT_REQUIRED)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._host, self._port, self._keepalive = out.host, out.port, cfg.keepalive_s

    def start(self, report) -> None:  # noqa: ANN001 (line.products.Report)
        self._report = report
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        # A retained product comes right after the SUBACK; with none, the topic names no product yet.
        threading.Timer(0.5, self.ready.set).start()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        product = msg.payload.decode("utf-8", "replace").strip() or None
        at = -math.inf if msg.retain and not self.ready.is_set() else time.time()
        if self._report is not None:
            self._report(product, at)
        self.product = product  # after the report: who sees it here finds the changeover recorded
        self.ready.set()
