"""`inspect station`: the page as a user sees it in a real headless Chromium, and its guards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from services import missing

from diffinspect import DiffinspectError
from diffinspect.scoring.record import Record
from diffinspect.station.app import Station, check_bind, create_app
from diffinspect.store.results import ResultStore

TOKEN = "s3cret-token-for-tests"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def rows(n: int, start: int, now: float, out: Path) -> list[Record]:
    """n rows: every 10th an error, of the others every 4th NG (with an overlay PNG in OUT/overlays)."""
    made = []
    for i in range(start, start + n):
        status = "error" if i % 10 == 9 else "ng" if i % 4 == 3 else "ok"
        overlay = None
        if status == "ng":
            img = np.zeros((64, 64, 3), np.uint8)
            cv2.circle(img, (32, 32), 12 + i % 8, (40, 40, 220), -1)
            overlay = str(out / "overlays" / f"frame_{i:04d}.png")
            Path(overlay).parent.mkdir(exist_ok=True)
            cv2.imwrite(overlay, img)
        score = None if status == "error" else (0.9 + 0.01 * (i % 7) if status == "ng" else 0.2 + 0.05 * (i % 9))
        health = json.dumps({"brightness": 120.0 + i % 5, "contrast": 30.0, "sharpness": -0.5, "shift": 0.01})
        made.append(Record(
            path=f"/cam/frame_{i:04d}.png", folder="/cam", size=100 + i, mtime=now, mtime_ns=i, status=status,
            score=score, threshold=None if status == "error" else 0.8, detector=None if status == "error" else "copod",
            backend=None if status == "error" else "copod", latency_ms=10.0 + i % 20, overlay=overlay,
            error="cannot decode" if status == "error" else None, fallback_reason=None, received_at=now - 0.05,
            scored_at=now, health=None if status == "error" else health))
    return made


@pytest.fixture
def out(tmp_path: Path):
    """OUT with 40 rows and an open alarm, the store kept open as a running watcher keeps it."""
    out = tmp_path / "out"
    store = ResultStore(out)
    now = time.time()
    store.commit(rows(40, 0, now, out))
    store.add_events([(now, "lighting", "lighting changed", "raised", "brightness median 80 (calibrated 120)",
                       "/cam")])
    (out / "station.json").write_text(json.dumps({"bands": {"brightness": [110, 130]}}))
    yield out, store
    store.close()


def test_counts_and_state(out):
    o, store = out
    s = Station(o).state()
    assert s["counts"]["hour"] == {**s["counts"]["hour"], "total": 40, "ok": 28, "ng": 8, "error": 4}
    assert s["counts"]["shift"]["total"] == 40
    assert [a["name"] for a in s["alarms"]] == ["lighting changed"]
    assert len(s["rejects"]) == 8 and s["rejects"][0]["overlay_url"].startswith("/files/overlays/")
    assert s["histogram"]["threshold"] == 0.8 and sum(s["histogram"]["counts"]) == 36
    assert s["latency"]["p50"] is not None and s["bands"]["brightness"] == [110, 130]
    assert len(s["health"]) == 36


def test_counts_by_time_window(tmp_path: Path):
    from diffinspect.station.app import shift_start

    now = time.time()
    store = ResultStore(tmp_path)
    try:
        for i, age in enumerate([7200] * 5 + [1800] * 3 + [0] * 4):
            store.commit(rows(1, i, now - age, tmp_path))
    finally:
        store.close()
    s = Station(tmp_path, "00:00,12:00").state(now)
    assert s["counts"]["hour"]["total"] == 7
    start = shift_start(now, [(0, 0), (12, 0)])
    assert now - 12 * 3600 < start <= now
    expected = sum(1 for age in [7200] * 5 + [1800] * 3 + [0] * 4 if now - age >= start)
    assert s["counts"]["shift"]["total"] == expected
    assert sum(b["ok"] + b["ng"] + b["error"] for b in s["trend"]) == 7


def test_station_never_creates_or_writes_the_database(tmp_path: Path):
    s = Station(tmp_path).state()
    assert s["ready"] is False
    assert not (tmp_path / "results.db").exists()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_station_reads_a_database_from_before_health_and_events(tmp_path: Path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "results.db")
    db.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY, path TEXT, folder TEXT, size INTEGER, mtime REAL, "
               "mtime_ns INTEGER, status TEXT, score REAL, threshold REAL, detector TEXT, backend TEXT, "
               "latency_ms REAL, overlay TEXT, error TEXT, fallback_reason TEXT, received_at REAL, scored_at REAL)")
    db.execute("INSERT INTO frames VALUES (1, '/c/a.png', '/c', 1, 0, 0, 'ng', 2.0, 1.0, 'diffusion', 'torch:cpu', "
               "5.0, '/elsewhere/a.png', NULL, NULL, ?, ?)", (time.time(), time.time()))
    db.commit()
    db.close()
    s = Station(tmp_path).state()
    assert s["counts"]["hour"]["ng"] == 1 and s["alarms"] == [] and s["health"] == []
    assert s["rejects"][0]["overlay_url"] is None  # an overlay outside OUT is never linked


def test_token_and_paths_outside_out_are_refused(server, tmp_path: Path):
    url, o, _ = server
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    (o / "overlays" / "link.png").symlink_to(secret)
    assert get(f"{url}/")[0] == 401
    assert get(f"{url}/api/state")[0] == 401
    assert get(f"{url}/api/state?token=wrong-token-x")[0] == 401
    assert get(f"{url}/files/overlays/frame_0003.png")[0] == 401
    assert get(f"{url}/api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    status, body = get(f"{url}/files/overlays/frame_0003.png?token={TOKEN}")
    assert status == 200 and body[:4] == b"\x89PNG"
    # The raw request paths below reach the server as written (no client-side normalization).
    for bad in ("../secret.txt", "overlays/../../secret.txt", "%2e%2e/secret.txt", "..%2fsecret.txt",
                str(secret).lstrip("/"), "/" + str(secret), "overlays/link.png", "results.db", ".watch.lock"):
        status, body = get(f"{url}/files/{bad}?token={TOKEN}")
        assert status == 404 and b"not for the page" not in body, bad
    assert Station(o).resolve_file(str(secret)) is None
    assert Station(o).resolve_file("../secret.txt") is None
    assert Station(o).resolve_file("overlays/link.png") is None
    assert Station(o).resolve_file("overlays/frame_0003.png") == (o / "overlays" / "frame_0003.png").resolve()


def test_page_files_ship_in_the_package_and_are_served(server):
    from importlib import resources

    from diffinspect.station.app import ASSETS

    static = resources.files("diffinspect.station").joinpath("static")
    html = static.joinpath("index.html").read_text(encoding="utf-8")
    # No inline script or style: the page names its two assets, which the app serves as they are.
    assert "<style" not in html and "<script>" not in html
    assert '<script src="/static/app.js">' in html and 'href="/static/style.css"' in html
    url, _, _ = server
    assert get(f"{url}/?token={TOKEN}") == (200, html.encode())
    for name in ASSETS:
        # without the token: they hold no results, and a browser does not pass ?token= on to them
        assert get(f"{url}/static/{name}") == (200, static.joinpath(name).read_bytes()), name
    assert get(f"{url}/static/index.html")[0] == 404
    assert get(f"{url}/static/..%2fapp.py")[0] == 404


def test_binding_off_loopback_needs_a_token():
    check_bind("127.0.0.1", None)
    with pytest.raises(DiffinspectError, match="token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(DiffinspectError, match="8 characters"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", TOKEN)


def test_cli_refuses_a_plant_network_bind_without_token(tmp_path: Path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("DIFFINSPECT_STATION_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "diffinspect", "station", str(tmp_path), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "token" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture
def server(out):
    import uvicorn

    o, store = out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(o, TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", o, store
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        missing("chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="station-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1300"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def text_becomes(driver, element_id: str, expected: str, timeout: float = 15.0) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d) -> bool:  # noqa: ANN001
        found = d.find_elements(By.ID, element_id)
        return bool(found) and found[0].text == expected

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except Exception:
        found = driver.find_elements(By.ID, element_id)
        return found[0].text if found else "<missing>"
    return expected


@pytest.mark.slow
def test_page_shows_the_line_and_updates_live(server, browser):
    from selenium.webdriver.common.by import By

    url, o, store = server
    browser.get(f"{url}/?token={TOKEN}")
    assert text_becomes(browser, "hour-total", "40") == "40"
    assert browser.find_element(By.ID, "hour-ng").text == "8"
    assert browser.find_element(By.ID, "shift-error").text == "4"
    assert "lighting changed" in browser.find_element(By.ID, "alarms").text
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#rejects img")
    assert len(thumbs) == 8
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumbs[0]) == 64
    assert len(browser.find_elements(By.CSS_SELECTOR, "#health svg")) == 4

    # New rows committed by the watcher appear without a reload.
    store.commit(rows(8, 40, time.time(), o))
    assert text_becomes(browser, "hour-total", "48") == "48"

    # Click a reject: its full overlay and its score against the threshold.
    browser.find_elements(By.CSS_SELECTOR, "#rejects figure")[0].click()
    modal = browser.find_element(By.ID, "modal")
    deadline = time.monotonic() + 10
    while "against threshold" not in modal.text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "against threshold 0.8000" in modal.text and "NG" in modal.text
    modal.click()

    shot = browser.get_screenshot_as_png()
    img = cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 500
    # Non-blank: many distinct colours, and the page's red (NG) and green (OK) are on it.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    b, g, r = (img[:, :, c].astype(int) for c in range(3))
    assert ((r > 180) & (g < 90) & (b < 90)).sum() > 200
    assert ((g > 130) & (r < 90) & (b < 110)).sum() > 100
    if os.environ.get("DIFFINSPECT_SCREENSHOT"):
        Path(os.environ["DIFFINSPECT_SCREENSHOT"]).write_bytes(shot)

    # Without the token the browser gets nothing but the refusal.
    browser.get(f"{url}/")
    assert "token required" in browser.page_source
    assert "hour-total" not in browser.page_source
    browser.get(f"{url}/files/..%2f..%2fsecret.txt?token={TOKEN}")
    assert "not found" in browser.page_source
