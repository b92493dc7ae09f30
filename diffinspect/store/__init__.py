"""results.db: the only package that imports sqlite3."""
