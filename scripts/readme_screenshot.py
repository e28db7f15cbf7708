"""The README's picture of `annotate view`: the demo run's output in the real viewer, shot by
Debian's Chromium through Playwright. `make screenshot` runs it after `make demo`'s first run.

Usage: python scripts/readme_screenshot.py OUTPUT_DIR PNG
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from pipeline.view.app import running

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"]


def main(output: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium: apt-get install chromium")
    with running(output) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820}, bypass_csp=True)
        page.goto(url)
        expect(page.locator(".card")).not_to_have_count(0)
        page.wait_for_function("[...document.querySelectorAll('.card .thumb img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        flagged = page.locator(".card", has=page.locator(".chip.flag")).first
        flagged.click()  # the detail pane of a row that needs a second look
        page.wait_for_function("document.getElementById('detail-image').naturalWidth > 0")
        page.screenshot(path=str(png))
        browser.close()
    print(f"wrote {png}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
