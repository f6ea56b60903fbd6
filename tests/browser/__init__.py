"""Helpers for the visualiser tests: synthetic datasets in the on-disk format, a headless Chromium harness."""
