"""results.db: the only package that imports sqlite3. Other packages name its failures by these names."""

import sqlite3

StoreError = sqlite3.Error  # locked for longer than the timeout, unreadable, or an I/O error
NotReady = sqlite3.OperationalError  # no tables yet (a watcher just starting), or busy
BANDS_FILE = "station.json"  # beside results.db: the calibrated health bands per camera the page draws
