"""Shim until test_demo (and test_tools) move: the names test_demo.py imports from
``clients``, which is now ``support.clients``. Other tests import from support."""

from support.clients import REPO, Browser, Lines, chromium_path, page_url, serve_directory

__all__ = ["REPO", "Browser", "Lines", "chromium_path", "page_url", "serve_directory"]
