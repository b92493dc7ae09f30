"""The README's station screenshot: a synthetic line whose lighting dims halfway, scored by a real
`inspect watch` run (cold-start COPOD bundle), shown by `inspect station` in headless Chromium.

    python bench/station_screenshot.py docs/station.png
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.synthetic import DEFECTS, render_frame
from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.scoring.cold_start import calibrate_copod_only
from diffinspect.scoring.loader import load_fallback
from diffinspect.station.app import create_app

SIZE = 128


def write(path: Path, img: np.ndarray, mtime: float) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    os.utime(path, (mtime, mtime))


def main(target: Path) -> None:
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    work = Path(tempfile.mkdtemp(prefix="station-shot-"))
    rng = np.random.default_rng(0)
    good = work / "good"
    good.mkdir()
    for i in range(150):
        write(good / f"g{i:03d}.png", render_frame("washer", rng, SIZE, None)[0], time.time())
    calibrate_copod_only(good, work / "model", 0.02)
    cam, out = work / "camera", work / "results"
    cam.mkdir()
    t0 = time.time() - 200
    for i in range(160):  # the lamp ages after frame 100
        defect = str(rng.choice(DEFECTS)) if rng.random() < 0.12 else None
        img = render_frame("washer", rng, SIZE, defect)[0]
        if i >= 100:
            img = (img.astype(np.float32) * 0.7).astype(np.uint8)
        write(cam / f"frame_{i:04d}.png", img, t0 + i)
    (cam / "frame_0999.png").write_bytes(b"\x89PNG\r\n\x1a\ntorn")  # one corrupt frame
    det = load_fallback(work / "model")
    run_watch([cam], out, lambda: det, lambda: det, WatchOptions(once=True, quiet=True, overlays="ng"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(out), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    profile = tempfile.mkdtemp(prefix="station-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1200,1250", "--hide-scrollbars"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        time.sleep(3)
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
        srv.should_exit = True
        shutil.rmtree(profile, ignore_errors=True)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{target}: {img.shape[1]}x{img.shape[0]}, {target.stat().st_size // 1024} KB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/station.png"))
