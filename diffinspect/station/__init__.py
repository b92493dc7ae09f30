"""`inspect station`: the live web page over results.db."""
