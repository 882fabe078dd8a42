"""A page rendered in real headless Chromium (Debian's, driven by Playwright): every chart image
loaded and on screen, the samples table visible with the given texts, a screenshot that is not blank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)


def assert_renders(page_file: Path, texts: list[str], shot: Path, charts: int = 3) -> None:
    """Skips without Chromium (CI installs it: see README's test command)."""
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from PIL import Image

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"], timeout=15000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(page_file.resolve().as_uri(), wait_until="load", timeout=10000)
            images = page.locator("img.chart")
            assert images.count() == charts
            for i in range(charts):
                chart = images.nth(i)
                chart.scroll_into_view_if_needed(timeout=5000)
                assert chart.evaluate("el => el.complete && el.naturalWidth > 0")
                box = chart.bounding_box()
                assert box is not None and box["width"] > 0 and box["height"] > 0
                assert box["y"] < 800 and box["y"] + box["height"] > 0  # inside the 1280x800 viewport
                assert box["x"] < 1280 and box["x"] + box["width"] > 0
            samples = page.locator("#samples")
            samples.scroll_into_view_if_needed(timeout=5000)
            assert samples.is_visible()
            shown = samples.inner_text()
            for text in texts:
                assert text in shown, text
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        assert rgb.height > 800
        assert any(low != high for low, high in rgb.getextrema())
        assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 50
