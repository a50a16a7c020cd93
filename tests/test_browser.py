"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload a generated image, caption it, match it, run a search, see a heat map; a screenshot is saved
in the test's tmp folder (and copied to $BLIP_SERVE_SCREENSHOT when set)."""
import os
import shutil
from pathlib import Path

import pytest

import blip
from blip.serve import Models, create_app
from serving import Served, pil, png, save_tiny

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                 reason="needs Debian's chromium and chromium-driver (make test installs them)")]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _run(driver, task: str, texts: str | None = None, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    if texts is not None:
        box = driver.find_element(By.ID, "texts")
        box.clear()
        box.send_keys(texts)
    driver.execute_script("delete document.body.dataset.done")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.done") == task
        or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    status = driver.find_element(By.ID, "status")
    assert "error" not in status.get_attribute("class"), status.text


def test_page_captions_matches_searches_and_grounds(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from blip.index import build_index
    ckpts = save_tiny(tmp_path / "ckpt")
    caption, retrieval = blip.load(ckpts["caption"], device="cpu"), blip.load(ckpts["retrieval"], device="cpu")
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(20 + i))
    index = build_index(retrieval, tmp_path / "images", tmp_path / "index", progress=False)
    served = Served(create_app(Models(main=caption, retrieval=retrieval, index=index,
                                      names={"caption": "tiny caption", "match": "tiny retrieval"})))
    try:
        picture = tmp_path / "picture.png"
        picture.write_bytes(png(7, (160, 120)))
        browser.get(served.url + "/")
        assert browser.title == "blip serve"
        browser.find_element(By.ID, "file").send_keys(str(picture))
        assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")

        _run(browser, "caption")
        assert browser.find_element(By.ID, "caption").text == caption.caption([pil(picture.read_bytes())])[0]

        _run(browser, "match", "a red square\na dog")
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert [b.find_element(By.CSS_SELECTOR, ".name span").text for b in bars] == ["a red square", "a dog"]

        _run(browser, "search", "a red square")
        figures = browser.find_elements(By.CSS_SELECTOR, "#grid figure")
        assert len(figures) == 5
        assert all(f.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg")
                   for f in figures)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(  # the thumbnails decode as images
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))

        _run(browser, "ground", "a red square on the left")
        overlay = browser.find_element(By.ID, "overlay")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        words = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#words button")]
        assert words == ["whole text", "a", "red", "square", "on", "the", "left"]
        browser.find_elements(By.CSS_SELECTOR, "#words button")[3].click()  # one word's map
        WebDriverWait(browser, 10).until(
            lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") == 160)

        browser.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 10_000
        if os.environ.get("BLIP_SERVE_SCREENSHOT"):
            shutil.copy(tmp_path / "serve.png", Path(os.environ["BLIP_SERVE_SCREENSHOT"]))
    finally:
        served.close()
