"""One head method per file; ``config.py`` decides which layer gets which."""
