"""Browser tests: the web page in headless chromium."""
