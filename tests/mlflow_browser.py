"""Headless Chromium on the MLflow UI: the runs table and the compare view, with screenshots.

Used by ``tests/tracking/test_mlflow_ui.py``; it also makes the README's screenshots from a running
``mlflow ui``::

    python -m tests.mlflow_browser --url http://127.0.0.1:5000 --output docs/images

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (dev extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tumorseg.tracking import client as tracking

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,900",
)
PAGE_S = 90  # the UI's first load (a large bundle) on a busy machine
# ag-grid rows of the runs table: {run id: {column id: cell text}}
TABLE_JS = """
const rows = {};
for (const row of document.querySelectorAll('.ag-row[row-id]')) {
  const id = row.getAttribute('row-id');
  rows[id] = rows[id] || {};
  for (const cell of row.querySelectorAll('.ag-cell[col-id]')) {
    rows[id][cell.getAttribute('col-id')] = cell.innerText;
  }
}
return rows;
"""
NAME_COL, DATASET_COL = "attributes.`Run Name`", "attributes.`Dataset`"
MODELS_COL = "attributes.`Models`"


def metric_col(key: str) -> str:
    return f"metrics.`{key}`"


class BrowserMissing(RuntimeError):
    """Chromium, chromedriver or selenium is not installed."""


def chromium():
    """Headless Chromium driven through chromedriver (Debian's packages)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        raise BrowserMissing(
            "Chromium is not installed (Debian: apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise BrowserMissing("selenium is not installed (pip install -e '.[dev]')") from err
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def open_page(browser, url: str) -> None:
    """Open ``url`` with MLflow's assistant side panel closed (it covers the table)."""
    origin = url.split("#")[0]
    if not browser.current_url.startswith(origin):
        browser.get(origin)
        browser.execute_script(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
    browser.get(url)


def wait_for(browser, condition: Callable[[Any], Any], what: str, timeout: float = PAGE_S):
    """``condition(browser)`` once truthy; TimeoutError naming ``what`` otherwise."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page re-renders while it loads: an element found a moment ago may be gone; ask again
    wait = WebDriverWait(
        browser, timeout, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(condition)
    except TimeoutException:
        raise TimeoutError(f"{what} not shown after {timeout:.0f} s") from None


def body_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def headings(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]


def table(browser) -> dict[str, dict[str, str]]:
    return browser.execute_script(TABLE_JS)


def show_runs_table(browser, base: str, experiment_id: str, runs: int, metrics: Iterable[str]):
    """The runs table at the project's runs URL, with ``metrics`` as columns (ticked in the
    column selector, as a user would); returns its rows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, tracking.runs_url(base, experiment_id))
    wait_for(browser, lambda b: len(table(b)) >= runs, f"{runs} runs in the runs table")
    # the model-training view: its page title is "Runs" (the GenAI view shows the same table
    # as "Training runs", beside traces, sessions and evaluation runs)
    wait_for(browser, lambda b: headings(b) == ["Runs"], "the model-training view")
    if "Evaluation runs" in body_text(browser):
        raise AssertionError("the runs table opened in MLflow's GenAI view")
    for key in metrics:
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
        item = wait_for(
            browser,
            lambda b, key=key: b.find_element(By.XPATH, f"//span[normalize-space(text())='{key}']"),
            "the column selector",
        )
        item.click()
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait_for(
            browser,
            lambda b, key=key: all(metric_col(key) in r for r in table(b).values()),
            f"the {key} column",
        )
    return table(browser)


def compare_all(browser, names: Iterable[str]) -> list[str]:
    """From the runs table: select every run, press Compare; returns the compared run ids once
    the compare view shows ``names`` and its plot."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, ".ag-header-cell input[type=checkbox]").click()
    compare = "//button[normalize-space(.)='Compare']"
    button = wait_for(
        browser,
        lambda b: next((e for e in b.find_elements(By.XPATH, compare) if e.is_enabled()), None),
        "an enabled Compare button",
    )
    button.click()
    wait_for(browser, lambda b: "compare-runs" in b.current_url, "the compare view")
    names = list(names)
    wait_for(
        browser,
        lambda b: (
            f"Comparing {len(names)} Runs" in body_text(b) and all(n in body_text(b) for n in names)
        ),
        "the runs in the compare view",
    )
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), "the plot")
    query = urllib.parse.parse_qs(browser.current_url.split("?", 1)[1])
    return json.loads(query["runs"][0])


def plot_axes(browser) -> tuple[list[str], list[str]]:
    """The params and metrics the compare view's parallel-coordinates plot shows (the chips
    of its Parameters: and Metrics: selects)."""
    text = body_text(browser)
    if "Parameters:" not in text or "Clear All" not in text:
        return [], []
    block = text.split("Parameters:", 1)[1].split("Clear All", 1)[0]
    params, _, metrics = block.partition("Metrics:")
    return params.split(), metrics.split()


def save(browser, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not browser.save_screenshot(str(path)):
        raise OSError(f"{path}: screenshot not written")
    return path


def main(argv: list[str] | None = None) -> int:
    """Screenshots of a running UI: the runs table (with ``--metrics`` columns) and the compare
    view of all its runs, as ``mlflow_runs_table.png`` and ``mlflow_compare_runs.png``."""
    parser = argparse.ArgumentParser(prog="python -m tests.mlflow_browser")
    parser.add_argument("--url", default=tracking.UI_URL, help="the MLflow UI (%(default)s)")
    parser.add_argument("--experiment", default="tumorseg", help="experiment name")
    parser.add_argument("--metrics", nargs="*", default=["val/dice_mean", "test/dice_mean"])
    parser.add_argument("--output", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    api = f"{args.url.rstrip('/')}/api/2.0/mlflow"
    query = urllib.parse.urlencode({"experiment_name": args.experiment})
    from selenium.webdriver.common.by import By

    with urllib.request.urlopen(f"{api}/experiments/get-by-name?{query}", timeout=30) as resp:
        experiment_id = json.load(resp)["experiment"]["experiment_id"]
    browser = chromium()
    try:
        rows = show_runs_table(browser, args.url, experiment_id, 1, args.metrics)
        print(save(browser, args.output / "mlflow_runs_table.png"))
        names = [r[NAME_COL].splitlines()[-1] for r in rows.values()]
        compare_all(browser, names)
        # the Compare button drops the view from the URL; keep the model-training side bar
        open_page(browser, f"{browser.current_url}&{tracking.RUNS_VIEW}")
        wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), "plot")
        print(save(browser, args.output / "mlflow_compare_runs.png"))
    finally:
        browser.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
