"""The README's picture of the demo page, taken by headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium) over a trained run:

    python train.py --dataset shapes-chat                 # the laptop chatbot, about 2 minutes
    python -m docs.screenshot --run out/shapes-chat       # -> docs/demo.png

It serves the run as `python demo.py --run` does, asks about the first example picture, asks a
follow-up, and saves the page. tests/test_demo_browser.py drives the page with the same browser.
"""
import argparse
import shutil
import threading

INSTALL = ("install Chromium, its driver and selenium: apt-get install chromium chromium-driver (Debian, Ubuntu), "
           "pip install selenium")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(width: int = 1200, height: int = 900):
    """A headless Chromium under selenium, pointed at the installed executables (nothing is
    downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError(f"no Chromium found: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)  # --no-sandbox: Chromium's sandbox refuses to run as root (CI)
    return webdriver.Chrome(service=Service(found[1]), options=options)


def ask(driver, text: str | None = None, answers: int = 1, timeout: float = 120):
    """Send the prompt box's text (or `text`) and wait for the page to show `answers` answers done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "prompt")
    if text is not None:
        box.clear()
        box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done], .answer.error")) >= answers)


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--run", default="out/shapes-chat", help="a train.py output_dir")
    ap.add_argument("--out", default="docs/demo.png")
    ap.add_argument("--follow_up", default="What else is in the picture?")
    return ap


def main(argv=None):
    import demo
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    args = parser().parse_args(argv)
    server = demo.make_server(demo.load(demo.DemoConfig(run=args.run)), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = start_chromium(1200, 900)
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples img"))
        driver.find_elements(By.CSS_SELECTOR, "#examples img")[0].click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drop img"))
        ask(driver)
        ask(driver, args.follow_up, answers=2)
        height = driver.execute_script("return document.documentElement.scrollHeight + outerHeight - innerHeight")
        driver.set_window_size(1200, height)  # the whole page, nothing cut off
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
