"""The dashboard in a real headless Chromium (selenium): it shows the nodes and the plan, and a chat gets an answer."""

import shutil

import pytest

pytest.importorskip("selenium", reason="selenium is a test extra (pip install -e .[test])")
pytest.importorskip("fastapi", reason="fastapi is needed by turbo-cluster serve")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_server import start_server, stop_server  # noqa: E402


def texts(driver, css: str) -> list[str]:
    """The visible text of every element matching css, read in one script run.

    The page re-renders its tables on every poll, so an element found in one call can be gone by
    the next (a stale reference); reading inside the page is atomic with respect to that."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);", css)


def test_dashboard_shows_cluster_and_chats(tmp_path):
    proc, url, lines = start_server("--workers", "2")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(texts(d, "#nodes tr.node")) == 2)
        rows = texts(driver, "#nodes tr.node")
        assert "local-0" in rows[0] and "0:15" in rows[0] and "local-1" in rows[1] and "15:30" in rows[1]
        assert "cpu" in rows[0]
        assert "SmolLM2" in texts(driver, "#model")[0]
        assert len(texts(driver, "#plan div")) == 2
        driver.find_element(By.ID, "msg").send_keys("Hello!")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: texts(d, "#log .assistant.done"))
        answer = texts(driver, "#log .assistant.done")[0]
        assert answer.startswith("model: ") and len(answer) > len("model: ")
        # the chat's session is kept on both nodes and the next poll lists it with its placement
        wait.until(lambda d: texts(d, "#sessions tr.session"))
        row = texts(driver, "#sessions tr.session")[0]
        assert "kept" in row and "local-0 0:15" in row and "local-1 15:30" in row
        assert texts(driver, "#error") == [""]
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
        rc = stop_server(proc)
    assert rc == 0, "".join(lines)[-3000:]
