"""Screenshots of a training run's MLflow page for the README (docs/mlflow-run-*.png).

Not part of the product or the suite: it needs Playwright (``pip install playwright``) and a
Chromium (Debian: ``apt-get install chromium``). How the README's pictures were taken::

    make demo
    .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/demo/mlflow.db \\
        --host 127.0.0.1 --port 25000 &
    python docs/screenshots.py --url http://127.0.0.1:25000 --experiment 1 --run RUN_ID
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

# Headless Chromium on a machine without outside network: no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the MLflow UI, e.g. http://127.0.0.1:25000")
    p.add_argument("--experiment", required=True)
    p.add_argument("--run", required=True, help="the training run's id")
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    run_page = f"{args.url}/#/experiments/{args.experiment}/runs/{args.run}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(run_page)
        page.wait_for_timeout(5000)
        close = page.locator('button[aria-label="Close"]')  # the assistant side panel
        if close.count():
            close.first.click()
        page.wait_for_timeout(1000)
        page.screenshot(path=args.out / "mlflow-run-overview.png")
        page.get_by_text("Model metrics", exact=True).first.click()
        page.wait_for_timeout(5000)
        page.screenshot(path=args.out / "mlflow-run-metrics.png")
        browser.close()


if __name__ == "__main__":
    main()
