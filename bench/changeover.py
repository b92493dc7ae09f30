"""Benchmark of a product changeover reaching the station ([watch.products], line/products.py).

A real Mosquitto broker and asyncua's OPC UA server (the test suite's stand-in PLC) are started on loopback.
Per signal, the line changes over between two products N times, about a second apart, and this measures:

    known after     the command (MQTT publish, the PLC's write) to the station's signal reporting it, p50/p99:
                    a frame routed in this window after a changeover still gets the old product
    in force from   the time the station records for the changeover minus the command's time, p50/p99
                    (MQTT: the message's arrival; OPC UA: the node's source timestamp)

    python bench/changeover.py              # 50 changeovers per signal, the node read every 0.2 s
    python bench/changeover.py --n 20 --poll-s 0.05
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffinspect.config import MqttConfig, OpcuaConfig, OpcuaNodes

_spec = importlib.util.spec_from_file_location("line_receivers",
                                               Path(__file__).parents[1] / "tests" / "line_receivers.py")
receivers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(receivers)


def measure(source, command, n: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """(known after, in force from) of n changeovers, in ms."""
    recorded: list[float] = []
    source.start(lambda product, at: recorded.append(at))
    if not source.ready.wait(15):
        raise SystemExit(f"{source.name}: no current product")
    known, in_force = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        product = ("housing", "cover")[i % 2]
        time.sleep(rng.uniform(0.5, 1.5))  # at random phases of the node's reads
        t0 = time.time()
        command(product)
        while source.product != product:
            time.sleep(0.0005)
        known.append((time.time() - t0) * 1000)
        in_force.append((recorded[-1] - t0) * 1000)
    source.stop()
    return known, in_force


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--poll-s", type=float, default=0.2)
    a = ap.parse_args()
    from diffinspect.outputs.mqtt import ProductTopic
    from diffinspect.outputs.opcua import ProductNode

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker = receivers.Broker(Path(tmp) / "broker").start()
        publish = receivers.LineController(broker, station="st1")
        try:
            publish("cover")
            results["MQTT command topic"] = measure(ProductTopic(MqttConfig(url=broker.url, station="st1")),
                                                    publish, a.n)
        finally:
            publish.close()
            broker.stop()
        plc = receivers.PlcServer().start()
        try:
            plc.product.write_value("cover")
            node = ProductNode(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(product=f"ns={plc.ns};s=Vision.Product"),
                                           poll_s=a.poll_s))
            results[f"PLC node, read every {a.poll_s:g} s"] = measure(node, plc.product.write_value, a.n)
        finally:
            plc.stop()
    print(f"| signal ({a.n} changeovers) | known after p50 / p99 | in force from p50 / p99 |")
    print("|---|---|---|")
    for name, (known, in_force) in results.items():
        k50, k99 = np.percentile(known, [50, 99])
        f50, f99 = np.percentile(in_force, [50, 99])
        print(f"| {name} | {k50:.1f} / {k99:.1f} ms | {f50:+.1f} / {f99:+.1f} ms |")


if __name__ == "__main__":
    sys.exit(main())
