"""OPC UA output of the outbox (asyncua): the station writes each verdict into the PLC's own nodes.

Why a client writing to the PLC, not a server the PLC reads: on a line the PLC is the OPC UA server
(S7-1500, TwinCAT, CODESYS runtimes serve their tags), the PLC program owns the tags it acts on, and
smart cameras hand results over the same way, by writing to the controller. A station serving nodes would
make the PLC programmer add an OPC UA client and poll it, and the station could never know that a
verdict was seen; a write answered Good is an acknowledgement the outbox can count on.

Per frame, one Write request: reject, score, then the counter (the frame's id in results.db). The PLC
program latches reject and score when it sees the counter change; the id keeps advancing across
restarts, and a verdict re-sent after a crash carries the same counter value, so the PLC ignores it.
Each value is sent as the node's own data type (read once on connecting): a PLC refuses a Double written
to a REAL tag.

With several products ([watch.products]), ProductNode reads the node the PLC sets at a changeover (a string,
or a number that names the product) on a connection of its own, polled every poll_s: one small read.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import threading
import time

from diffinspect.config import OpcuaConfig
from diffinspect.outputs.outbox import OutputError

PASSWORD_ENV = "DIFFINSPECT_OPCUA_PASSWORD"
INSTALL_HINT = "the OPC UA output needs asyncua: pip install 'diffinspect[opcua]'"

_INT_RANGES = {"SByte": (-(1 << 7), 1 << 8), "Byte": (0, 1 << 8), "Int16": (-(1 << 15), 1 << 16),
               "UInt16": (0, 1 << 16), "Int32": (-(1 << 31), 1 << 32), "UInt32": (0, 1 << 32),
               "Int64": (-(1 << 63), 1 << 64), "UInt64": (0, 1 << 64)}


def _counter_value(frame_id: int, vtype: str) -> int:
    """The id, wrapped into the node's integer range (a PLC compares counters for change, not size)."""
    low, span = _INT_RANGES[vtype]
    return (frame_id - low) % span + low if low else frame_id % span


class OpcuaOutput:
    streams = ("frames",)

    def __init__(self, cfg: OpcuaConfig, name: str = "opcua") -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise OutputError(INSTALL_HINT) from None
        import logging

        # asyncua logs at WARNING what is normal for a plain connection (no signing policy, the server's
        # session timeout); the outbox says what matters in one line.
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        self.cfg, self.name = cfg, name
        self.where = f"OPC UA server {cfg.url}"
        self._client = None
        self._nodes: list[tuple[str, object, str]] = []  # (role, node, variant type name)
        self.acknowledged_rows = 0

    def open(self) -> None:
        from asyncua import ua

        self.close()
        try:
            client = _connect(self.cfg)
        except Exception as exc:
            raise OutputError(f"cannot connect to the {self.where} ({_describe(exc)})") from None
        self._client = client
        nodes = self.cfg.nodes
        self._nodes = []
        for role in ("reject", "score", "counter"):
            node_id = getattr(nodes, role)
            if not node_id:
                continue
            try:
                node = client.get_node(node_id)
                vtype = node.read_data_type_as_variant_type()
            except ua.UaStatusCodeError as exc:
                self.close()
                raise OutputError(f"node {node_id!r} (watch.opcua.nodes.{role}) on the {self.where}: "
                                  f"{_describe(exc)}") from None
            except Exception as exc:
                self.close()
                raise OutputError(f"cannot read node {node_id!r} on the {self.where} ({_describe(exc)})") from None
            if role == "reject" and vtype.name != "Boolean" and vtype.name not in _INT_RANGES:
                raise self._bad_type(node_id, role, vtype.name, "Boolean or an integer")
            if role == "score" and vtype.name not in ("Float", "Double"):
                raise self._bad_type(node_id, role, vtype.name, "Float or Double")
            if role == "counter" and vtype.name not in _INT_RANGES:
                raise self._bad_type(node_id, role, vtype.name, "an integer type")
            self._nodes.append((role, node, vtype.name))

    def _bad_type(self, node_id: str, role: str, got: str, want: str) -> OutputError:
        self.close()
        return OutputError(f"node {node_id!r} (watch.opcua.nodes.{role}) is {got}; it must be {want}")

    def send(self, stream: str, row: dict) -> None:
        from asyncua import ua

        client = self._client
        if client is None:
            raise OutputError(f"not connected to the {self.where}")
        values = []
        for role, _node, vtype in self._nodes:
            if role == "reject":
                # Only ok passes: an error (could not be scored) or a hold (an alarm is open for its camera)
                # goes to manual check like an NG.
                value: object = row["status"] != "ok"
                value = value if vtype == "Boolean" else int(value)
            elif role == "score":
                score = row.get("score")
                value = float(score) if score is not None and math.isfinite(score) else math.nan
            else:
                value = _counter_value(int(row["id"]), vtype)
            values.append(ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vtype))))
        try:
            results = client.write_values([n for _, n, _ in self._nodes], values, raise_on_partial_error=False)
        except Exception as exc:
            raise OutputError(f"lost the connection to the {self.where} ({_describe(exc)})") from None
        for (role, _node, _), status in zip(self._nodes, results, strict=True):
            if not status.is_good():
                raise OutputError(f"the {self.where} refused the write of {role}: {status.name}")
        self.acknowledged_rows += 1

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _quietly(client.disconnect)


def _unix(stamp: datetime.datetime | None) -> float | None:
    """An OPC UA timestamp (UTC; asyncua may hand it over without its zone) as unix seconds."""
    if stamp is None:
        return None
    return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=datetime.UTC)).timestamp()


def _connect(cfg: OpcuaConfig):  # noqa: ANN202 (asyncua.sync.Client)
    """A client connected to the PLC's server with the configured user and security (disconnected again
    when connecting fails)."""
    from asyncua.sync import Client

    client = Client(cfg.url, timeout=cfg.timeout_s, sync_wrapper_timeout=cfg.timeout_s * 3)
    try:
        if cfg.username:
            client.set_user(cfg.username)
            client.set_password(os.environ.get(PASSWORD_ENV) or cfg.password or "")
        if cfg.security:
            client.set_security_string(cfg.security)
        client.connect()
    except Exception:
        _quietly(client.disconnect)
        raise
    return client


def _quietly(fn) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):  # a broken connection is being dropped
        fn()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ProductNode:
    """The PLC's product node (line/products.py ProductSource), read every poll_s on a connection of its own.

    The value read on the first connection was in force before the start; a change later is in force from
    the node's source timestamp (when the PLC wrote it), or from the read that saw it when the server gives
    none or one that is not between the previous read and now (another clock). An empty string names no
    product. A lost connection is retried every few seconds; the product in force stays until a read says
    otherwise."""

    name = "opcua"

    def __init__(self, cfg: OpcuaConfig, warn=None) -> None:  # noqa: ANN001 (Callable[[str], None])
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise OutputError(INSTALL_HINT) from None
        if not cfg.nodes.product:
            raise OutputError("watch.opcua.nodes.product is not set")
        import logging

        logging.getLogger("asyncua").setLevel(logging.ERROR)  # as OpcuaOutput: normal for a plain connection
        self.cfg, self.where = cfg, f"OPC UA server {cfg.url}"
        self.warn = warn or (lambda text: None)
        self.ready = threading.Event()
        self.product: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, report) -> None:  # noqa: ANN001 (line.products.Report)
        self._thread = threading.Thread(target=self._run, args=(report,), name="watch-product-node", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.cfg.timeout_s * 3)

    def _run(self, report) -> None:  # noqa: ANN001
        seen: object = None
        last_read = -math.inf
        failing = False
        while not self._stop.is_set():
            client = None
            try:
                client = _connect(self.cfg)
                node = client.get_node(self.cfg.nodes.product)
                while not self._stop.is_set():
                    data = node.read_data_value()
                    now = time.time()
                    value = data.Value.Value if data.Value is not None else None
                    if not self.ready.is_set() or value != seen:
                        stamp = _unix(data.SourceTimestamp)
                        at = (-math.inf if not self.ready.is_set()
                              else stamp if stamp is not None and last_read - 1.0 <= stamp <= now else now)
                        product = None if value is None else str(value).strip() or None
                        report(product, at)
                        self.product, seen = product, value
                        self.ready.set()
                    last_read = now
                    self._stop.wait(self.cfg.poll_s)
                    failing = False
            except Exception as exc:
                if not failing:  # once per outage
                    self.warn(f"product node on the {self.where}: {_describe(exc)}; retrying every 3 s")
                failing = True
                self.ready.set()  # the start does not wait for a server that is down
                self._stop.wait(3.0)
            finally:
                if client is not None:
                    _quietly(client.disconnect)
