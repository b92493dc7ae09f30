"""The operator's word: reviews on the station page, their rates, their export, and re-learning from them."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import pytest
from test_station import TOKEN, browser, rows, running  # noqa: F401 (browser: a fixture)

from diffinspect import DiffinspectError
from diffinspect.station.app import create_app, parse_reviewers
from diffinspect.station.reviewed import betainc, clopper_pearson, summary
from diffinspect.store.reader import Tally
from diffinspect.store.results import ResultStore
from diffinspect.store.reviews import ReviewWriter, all_reviews, frame_file, reviewed_good_files

REVIEWERS = {"anna": "anna-review-secret", "ben": "ben-review-secret"}


@pytest.fixture
def out(tmp_path: Path):
    """OUT with 40 rows (every 4th of the scored ones NG, every 10th an error), the store open as a watcher's."""
    out = tmp_path / "out"
    store = ResultStore(out)
    store.commit(rows(40, 0, time.time(), out))
    yield out, store
    store.close()


def post(port: int, body: object, headers: dict[str, str] | None = None, path: str = "/api/review"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                                          **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if r.getheader("content-type") == "application/json" else raw.decode()
    finally:
        conn.close()


def get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        return json.loads(r.read())
    finally:
        conn.close()


def ids(db: Path, status: str) -> list[int]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT id FROM frames WHERE status = ? ORDER BY id", (status,))]


def frames_table(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT * FROM frames ORDER BY id").fetchall()


# -- the exact interval --------------------------------------------------------------------------


def test_clopper_pearson_bounds_are_where_the_binomial_tails_are_two_and_a_half_percent():
    def at_least(x: int, n: int, p: float) -> float:
        return sum(comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1))

    for x, n in ((1, 10), (3, 20), (17, 60), (40, 400), (7, 1000)):
        lo, hi = clopper_pearson(x, n)
        assert lo < x / n < hi
        assert at_least(x, n, lo) == pytest.approx(0.025, abs=1e-9)
        assert 1 - at_least(x + 1, n, hi) == pytest.approx(0.025, abs=1e-9)
    assert clopper_pearson(1, 10) == pytest.approx((0.002529, 0.445016), abs=1e-6)  # the published table's values
    assert clopper_pearson(0, 5)[0] == 0.0 and clopper_pearson(5, 5)[1] == 1.0
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    # I_x(a, b) against the binomial sum it equals for whole a, b
    assert betainc(3, 8, 0.2) == pytest.approx(at_least(3, 10, 0.2), abs=1e-12)


def test_the_measured_rate_counts_good_parts_over_good_parts_scored():
    now = 1000.0
    reviews = ([{"status": "ng", "verdict": "good", "scored_at": now + i} for i in range(2)]
               + [{"status": "ng", "verdict": "defect", "scored_at": now + 5}] * 8
               + [{"status": "ok", "verdict": "defect", "scored_at": now + 9, "name": "x"}])
    s = summary(Tally.of(reviews, 10), lambda since: {"ok": 191, "ng": 10, "error": 0, "hold": 0},
                {"false_reject_rate": 0.01})
    assert s["rejects_reviewed"] == 10 and s["good_rejects"] == 2 and s["misses"] == 1
    assert s["good_share"] == 0.2 and s["good_share_interval"] == pytest.approx(clopper_pearson(2, 10))
    # 10 rejects, a fifth of them good: 2 good parts rejected of 190 + 2 good parts (one OK frame was a miss)
    assert s["false_reject_rate"] == pytest.approx(2 / 192)
    lo, hi = clopper_pearson(2, 10)
    assert s["false_reject_interval"] == pytest.approx([10 * lo / (190 + 10 * lo), 10 * hi / (190 + 10 * hi)])
    assert s["bound"] == {"false_reject_rate": 0.01}
    empty = summary(Tally(), lambda since: {}, None)
    assert empty["good_share"] is None and empty["false_reject_rate"] is None and empty["misses"] == 0


# -- the station ----------------------------------------------------------------------------------


def test_a_review_is_recorded_with_its_reviewer_and_never_changes_the_verdict(out):
    o, store = out
    db = o / "results.db"
    before = frames_table(db)
    ng, ok = ids(db, "ng"), ids(db, "ok")
    with running(create_app(o, reviewers=REVIEWERS, bound={"false_reject_rate": 0.01, "n": 200, "rule": "split",
                                                            "confidence": 0.95})) as port:
        status, r = post(port, {"frame_id": ng[0], "verdict": "good", "note": "  scratch on the tray, not the part "},
                         {"X-Review-Token": REVIEWERS["ben"]})
        assert status == 200 and r["who"] == "ben" and r["verdict"] == "good" and r["status"] == "ng"
        assert r["note"] == "scratch on the tray, not the part" and r["frame_id"] == ng[0]
        assert post(port, {"frame_id": ng[1], "verdict": "defect"}, {"X-Review-Token": REVIEWERS["anna"]})[0] == 200
        assert post(port, {"frame_id": ok[0], "verdict": "defect", "note": "crack"},
                    {"X-Review-Token": REVIEWERS["anna"]})[0] == 200
        # a correction: the latest review of a frame counts
        assert post(port, {"frame_id": ng[1], "verdict": "good"}, {"X-Review-Token": REVIEWERS["anna"]})[0] == 200
        state = get(port, "/api/state")
        assert state["reviewing"] is True
        v = state["reviews"]
        assert v["reviews"] == 3 and v["rejects_reviewed"] == 2 and v["good_rejects"] == 2 and v["misses"] == 1
        assert v["good_share_interval"] == pytest.approx(list(clopper_pearson(2, 2)))
        assert v["last_misses"][0]["frame_id"] == ok[0] and v["last_misses"][0]["note"] == "crack"
        assert v["bound"]["false_reject_rate"] == 0.01
        assert get(port, f"/api/frame/{ng[1]}")["review"]["who"] == "anna"
        assert get(port, f"/api/frame/{ng[2]}")["review"] is None
        # the watcher keeps committing while reviews are written
        store.commit(rows(4, 40, time.time(), o))
    assert frames_table(db)[:40] == before  # the delivered verdicts are as they were
    assert [(r["frame_id"], r["verdict"], r["who"]) for r in all_reviews(db)] == [
        (ng[0], "good", "ben"), (ng[1], "defect", "anna"), (ok[0], "defect", "anna"), (ng[1], "good", "anna")]


def test_reviews_are_refused_without_the_review_token(out):
    o, _ = out
    ng = ids(o / "results.db", "ng")[0]
    error = ids(o / "results.db", "error")[0]
    with running(create_app(o, reviewers=REVIEWERS)) as port:
        for headers in ({}, {"X-Review-Token": "wrong-secret"}, {"Authorization": f"Bearer {REVIEWERS['anna']}"},
                        {"Cookie": f"review={REVIEWERS['anna']}"}):
            status, r = post(port, {"frame_id": ng, "verdict": "good"}, headers)
            assert status == 403 and "review token required" in r["error"] and "\n" not in r["error"], headers
        ok_headers = {"X-Review-Token": REVIEWERS["anna"]}
        for body in ({"frame_id": ng, "verdict": "maybe"}, {"frame_id": "x", "verdict": "good"}, [1, 2], b"{nope",
                     {"frame_id": float(ng), "verdict": "good"}, {"frame_id": str(ng), "verdict": "good"},
                     {"frame_id": ng, "verdict": "good", "note": 5}):
            assert post(port, body, ok_headers)[0] == 400, body
        status, r = post(port, {"frame_id": error, "verdict": "good"}, ok_headers)
        assert status == 404 and "held and error frames" in r["error"]
        assert post(port, {"frame_id": 10**6, "verdict": "good"}, ok_headers)[0] == 404
        # the Host gate holds for reviews too: a page of another site rebound to 127.0.0.1 gets nothing
        status, _ = post(port, {"frame_id": ng, "verdict": "good"}, {**ok_headers, "Host": "evil.example"})
        assert status == 421
        assert get(port, "/api/state")["reviews"]["reviews"] == 0
    with running(create_app(o)) as port:  # no review token configured: the page is read-only
        status, r = post(port, {"frame_id": ng, "verdict": "good"}, {"X-Review-Token": REVIEWERS["anna"]})
        assert status == 403 and "--review-token" in r["error"]
        assert get(port, "/api/state")["reviewing"] is False
    with running(create_app(o, TOKEN, reviewers=REVIEWERS)) as port:  # a read token guards every request first
        assert post(port, {"frame_id": ng, "verdict": "good"}, {"X-Review-Token": REVIEWERS["anna"]})[0] == 401
        status, _ = post(port, {"frame_id": ng, "verdict": "good"}, {"X-Review-Token": REVIEWERS["anna"]},
                         path=f"/api/review?token={TOKEN}")
        assert status == 200


def test_review_tokens_are_named_distinct_and_not_the_read_token():
    assert parse_reviewers(["anna=anna-review-secret", " ben = ben-review-secret"]) == {
        "anna": "anna-review-secret", "ben": "ben-review-secret"}
    for specs, read, says in ((["anna"], None, "NAME=SECRET"), (["=12345678"], None, "NAME=SECRET"),
                              (["anna=short"], None, "at least 8"), (["a=12345678", "a=abcdefgh"], None, "named a"),
                              (["a=12345678", "b=12345678"], None, "share a secret"),
                              (["a=the-read-token"], "the-read-token", "read-only token")):
        with pytest.raises(DiffinspectError, match=says):
            parse_reviewers(specs, read)


def test_a_writer_waits_briefly_for_the_committer_and_the_table_comes_with_an_old_database(tmp_path: Path):
    o = tmp_path / "out"
    store = ResultStore(o)
    store.commit(rows(8, 0, time.time(), o))
    store.close()
    with sqlite3.connect(o / "results.db") as c:  # a results.db from before reviews
        c.execute("DROP TABLE reviews")
    ng = ids(o / "results.db", "ng")[0]
    with ReviewWriter(o / "results.db", timeout=0.2) as w:
        assert w.add(ng, "good", "anna")["verdict"] == "good"
        blocker = sqlite3.connect(o / "results.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the committer in the middle of a batch
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            w.add(ng, "defect", "anna")
        assert time.monotonic() - t0 < 2
        blocker.execute("ROLLBACK")
        blocker.close()
    with pytest.raises(DiffinspectError, match="nothing to review"):
        ReviewWriter(tmp_path / "nowhere" / "results.db")


# -- the frames reviewed good, and the export ---------------------------------------------------------


def test_reviewed_good_files_are_found_kept_or_moved_and_gone_ones_counted(tmp_path: Path):
    o = tmp_path / "out"
    cam = tmp_path / "cam"
    cam.mkdir()
    store = ResultStore(o)
    recs = rows(12, 0, time.time(), o)
    for r in recs:  # real files: kept in the camera folder, moved to OUT/ng, or deleted
        p = cam / Path(r.path).name
        p.write_bytes(os.urandom(100 + int(r.size)))
        st = p.stat()
        r.path, r.size, r.mtime_ns = str(p), st.st_size, st.st_mtime_ns
    store.commit(recs)
    store.close()
    ng = [r for r in recs if r.status == "ng"]
    assert len(ng) == 3
    (o / "ng").mkdir()
    (o / "ng" / Path(ng[1].path).name).write_bytes(b"another frame of the same name")
    os.replace(ng[1].path, o / "ng" / f"{Path(ng[1].path).stem}-1.png")  # moved, and renamed: the name was taken
    os.unlink(ng[2].path)  # deleted after scoring
    db = o / "results.db"
    with ReviewWriter(db) as w:
        for r in ng:
            w.add(r.id, "good", "anna")
        w.add(recs[0].id, "good", "anna")  # an OK frame confirmed good: not a reviewed reject, still a good part
        w.add(recs[1].id, "defect", "anna")
    files, gone = reviewed_good_files(o)
    assert files == [Path(ng[0].path), o / "ng" / f"{Path(ng[1].path).stem}-1.png", Path(recs[0].path)]
    assert gone == 1
    review = all_reviews(db)[0]
    Path(ng[0].path).write_bytes(b"the camera wrote a new frame under the old name")
    assert frame_file(o, review) is None


def test_inspect_reviews_exports_csv_and_errors_in_one_line(out, tmp_path: Path):
    o, _ = out
    ng = ids(o / "results.db", "ng")
    with ReviewWriter(o / "results.db") as w:
        w.add(ng[0], "good", "anna", 'said "fine", really')
        w.add(ng[1], "defect", "ben")
    dest = tmp_path / "reviews.csv"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-m", "diffinspect", "reviews", str(o), "--csv", str(dest)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    table = list(csv.DictReader(io.StringIO(dest.read_text())))
    assert [(int(r["frame_id"]), r["verdict"], r["who"], r["note"]) for r in table] == [
        (ng[0], "good", "anna", 'said "fine", really'), (ng[1], "defect", "ben", "")]
    assert table[0]["status"] == "ng" and table[0]["at"].endswith("+00:00")
    stdout = subprocess.run([sys.executable, "-m", "diffinspect", "reviews", str(o)], capture_output=True, text=True,
                            env=env)
    assert stdout.returncode == 0 and stdout.stdout.splitlines() == dest.read_text().splitlines()
    for args, says in (([str(tmp_path / "nowhere")], "results folder not found"),
                       ([str(tmp_path)], "no results.db")):
        bad = subprocess.run([sys.executable, "-m", "diffinspect", "reviews", *args], capture_output=True, text=True,
                             env=env)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -- the page ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_operator_reviews_a_reject_on_the_page(out, browser):  # noqa: F811 (the fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_station import text_becomes, text_of

    o, _ = out
    ng = ids(o / "results.db", "ng")
    bound = {"false_reject_rate": 0.01, "n": 300, "rule": "split", "confidence": 0.95}
    with running(create_app(o, reviewers=REVIEWERS, bound=bound)) as port:
        browser.get(f"http://127.0.0.1:{port}/")
        assert text_becomes(browser, "good-rejects", "0") == "0"
        assert "≤ 1.0 %" in text_of(browser, "bound")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#frames div")) == 12
        browser.find_element(By.CSS_SELECTOR, f'#rejects figure[data-id="{ng[-1]}"]').click()
        box = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "review"))
        assert "not reviewed yet" in box.text
        box.find_element(By.NAME, "token").send_keys("not-the-token")
        box.find_element(By.CSS_SELECTOR, 'button[data-verdict="good"]').click()
        assert text_becomes(browser, "review-said", "not saved: review token required (X-Review-Token)") \
            == "not saved: review token required (X-Review-Token)"
        token = box.find_element(By.NAME, "token")
        token.clear()
        token.send_keys(REVIEWERS["anna"])
        box.find_element(By.NAME, "note").send_keys("dust on the lens")
        box.find_element(By.CSS_SELECTOR, 'button[data-verdict="good"]').click()
        assert text_becomes(browser, "review-said", "reviewed: good part by anna, saved") \
            == "reviewed: good part by anna, saved"
        assert browser.find_element(By.ID, "modal").get_attribute("class") == "open"  # the controls do not close it
        assert text_becomes(browser, "good-rejects", "1") == "1"
        assert text_of(browser, "good-share") == "100.0 %"
    assert [(r["frame_id"], r["verdict"], r["who"], r["note"]) for r in all_reviews(o / "results.db")] == [
        (ng[-1], "good", "anna", "dust on the lens")]


# -- a poll reads the reviews in bounded ranges ------------------------------------------------------------


def reviewed_out(out: Path, n: int, now: float) -> list[int]:
    """OUT with 10 n frames over the 3 days before `now` and n reviews of them, oldest frame first, some
    corrected; returns the reviewed frame ids."""
    store = ResultStore(out)
    made = rows(10 * n, 0, now, out)
    for i, r in enumerate(made):
        r.scored_at, r.overlay = now - 3 * 86400 * (1 - i / len(made)), None
    store.commit(made)
    store.close()
    reviewed = ids(out / "results.db", "ng")[: n // 2] + ids(out / "results.db", "ok")[: n - n // 2]
    with ReviewWriter(out / "results.db") as w:
        w._db.execute("PRAGMA synchronous=OFF")  # thousands of reviews in a test: no fsync each
        for i, f in enumerate(sorted(reviewed)):
            w.add(f, "good" if i % 3 == 0 else "defect", "anna")
            if i % 7 == 0:  # a correction: the latest review of the frame counts
                w.add(f, "defect" if i % 3 == 0 else "good", "ben")
    return reviewed


def naive_reviews(db: Path, since_counts) -> dict:  # noqa: ANN001
    """The review figures from every review, each frame's latest one counting."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        latest = [dict(r) for r in c.execute(
            "SELECT * FROM reviews WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY frame_id) ORDER BY id")]
    s = summary(Tally.of(latest, 10), since_counts, None)
    return {**s, "last": [r["id"] for r in s["last"]], "last_misses": [r["id"] for r in s["last_misses"]]}


def test_a_poll_reads_the_reviews_in_bounded_ranges_however_many_there_are(tmp_path: Path, monkeypatch):
    """Ten times the reviews (and the frames since the first reviewed one) leave a poll's cost as it was: the
    figures come from the summaries each review keeps and from the frames counted between polls. They are
    those of every review read afresh, also for a database whose reviews were written before the summaries."""
    import diffinspect.station.app as app
    from diffinspect.station.app import Station
    from diffinspect.store.reader import ResultsReader

    now = float(int(time.time()))
    clock = [now]
    monkeypatch.setattr(app.time, "time", lambda: clock[0])
    steps, real = [0], ResultsReader._connect

    def connect(self, timeout):  # noqa: ANN001, ANN202
        db = real(self, timeout)
        db.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 100)
        return db

    monkeypatch.setattr(ResultsReader, "_connect", connect)
    cost = {}
    for n in (200, 2000):
        out = tmp_path / str(n)
        reviewed_out(out, n, now - 60)
        clock[0] = now
        station = Station(out)
        station.state()  # the first poll sums the frames since the first reviewed one
        store = ResultStore(out)
        store.commit(rows(5, 10 * n, now, out))
        clock[0] += 1
        steps[0] = 0
        got = station.state()["reviews"]
        cost[n] = steps[0]
        with ResultsReader(out / "results.db") as db:
            want = naive_reviews(out / "results.db", db.status_counts)
        assert {**got, "last": [r["id"] for r in got["last"]],
                "last_misses": [r["id"] for r in got["last_misses"]]} == want
        assert got["misses"] > 0 and got["rejects_reviewed"] > 0 and len(got["last_misses"]) == 10
        store.close()
        # Reviews written before the summaries: read from every review, then summarised once by the watcher.
        with sqlite3.connect(out / "results.db") as c:
            c.execute("DROP TABLE latest_reviews")
            c.execute("DROP TABLE review_counts")
        assert Station(out).state(clock[0])["reviews"]["good_rejects"] == want["good_rejects"]
        ResultStore(out).close()
        fresh = Station(out).state(clock[0])["reviews"]
        assert {**fresh, "last": [r["id"] for r in fresh["last"]],
                "last_misses": [r["id"] for r in fresh["last_misses"]]} == want
    assert cost[2000] <= cost[200] * 1.1 + 5, cost
