"""demo.html in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium through the page as a person uses it, against demo.py's server over the tiny chat run of
conftest.py's `site`. Skipped, saying how to install them, where there is no browser (.ci/run installs one)."""
import time

import pytest

import demo
from docs.screenshot import INSTALL, ask, find_chromium, start_chromium
from tests.helpers import Paced, chat, serve, user


try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None
pytestmark = pytest.mark.skipif(find_chromium() is None or selenium is None, reason=f"no headless browser: {INSTALL}")


class Markup(demo.Demo):
    """Answers with HTML, as a model may write any text (our tiny model cannot be made to)."""
    text = '<img src=x onerror=alert(1)><img src=x onerror="window.pwned=1"><b>bold</b>'

    def answer(self, job, send, still_there):
        for piece in (self.text[:20], self.text[20:]):
            send(piece)
        return {"text": self.text, "routing": {"llama": [[0.5, 0.5]], "clip": []}, "tokens": 2, "positions": 1,
                "seconds": 0.0}


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def by_css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def until(driver, condition, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.01).until(lambda d: condition())


WATCH = """window.seen = [];  // the last answer's text at every change the page makes to it
new MutationObserver(() => { const a = document.querySelectorAll('.answer'); if (a.length) window.seen.push(
  a[a.length - 1].textContent); }).observe(document.getElementById('log'), {subtree: true, childList: true,
  characterData: true});"""


def test_a_conversation_in_the_page(site, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    server, paced = serve(Paced, site.demo)
    d = browser
    try:
        d.set_window_size(1200, 900)
        d.get(url(server))
        until(d, lambda: len(by_css(d, "#examples img")) == 4 and "shapes-chat" in by_css(d, "#info")[0].text)
        by_css(d, "#examples img")[0].click()  # an example: its picture and its question
        until(d, lambda: by_css(d, "#drop img") and by_css(d, "#prompt")[0].get_property("value") == site.question)
        d.execute_script(WATCH)
        ask(d)
        _, done = chat(site, [user(site.question)], site.picture)  # the API's answer to the same question
        answer = by_css(d, ".answer")[0]
        assert answer.text == done["text"] and answer.get_attribute("data-done") == "1"
        seen = [t for t in d.execute_script("return window.seen") if t]
        partial = [t for t in dict.fromkeys(seen) if t != done["text"]]
        assert len(partial) >= 2 and all(done["text"].startswith(t) for t in partial), seen  # it streamed
        # the router chart: a bar per layer, each split as the routers' weights
        for part, weights in (("LLaMA", done["routing"]["llama"]), ("CLIP", done["routing"]["clip"])):
            bars = by_css(d, f'.chart [data-part="{part}"] .bar span')
            assert len(bars) == len(weights) > 0
            for bar, (w0, w1) in zip(bars, weights):
                widths = [float(i.value_of_css_property("width")[:-2]) for i in bar.find_elements("tag name", "i")]
                assert abs(widths[0] / sum(widths) - w0) < 0.01
        follow = "What else is in the picture?"  # a follow-up, sent with Enter
        by_css(d, "#prompt")[0].send_keys(follow, Keys.ENTER)
        until(d, lambda: len(by_css(d, ".answer[data-done]")) == 2)
        _, again = chat(site, [user(site.question), {"role": "assistant", "content": done["text"]}, user(follow)],
                        site.picture)
        assert by_css(d, ".answer")[1].text == again["text"]
        d.save_screenshot(str(tmp_path / "page.png"))
        d.set_window_size(390, 800)  # a phone's width: the columns stack, nothing sticks out sideways
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        # "New chat" while an answer streams: the answer is cancelled (the server stops it), not remembered
        d.execute_script("""window.sent = []; const fetch0 = window.fetch;  // the bodies the page posts
window.fetch = (url, options) => { if (options && options.body) window.sent.push(JSON.parse(options.body));
  return fetch0(url, options); };""")
        by_css(d, "#prompt")[0].send_keys("Is it blue?", Keys.ENTER)
        until(d, lambda: len(paced.sent) >= 1)
        by_css(d, "#new-chat")[0].click()
        assert by_css(d, "#log > *") == [] and by_css(d, "#drop img")  # the picture stays for the next chat
        until(d, lambda: paced.line == [])
        stopped = len(paced.sent)
        ask(d, "Is it red?")
        assert [m["content"] for m in d.execute_script("return window.sent")[-1]["messages"]] == ["Is it red?"]
        _, fresh = chat(site, [user("Is it red?")], site.picture)
        assert by_css(d, ".answer")[0].text == fresh["text"]
        _, whole = chat(site, [user(site.question), {"role": "assistant", "content": done["text"]}, user(follow),
                               {"role": "assistant", "content": again["text"]}, user("Is it blue?")], site.picture)
        assert stopped < whole["tokens"]  # the cancelled answer was cut short
        by_css(d, "#new-chat")[0].click()
        by_css(d, "#no-picture")[0].click()
        ask(d, "Which shape has three sides?")
        _, text_only = chat(site, [user("Which shape has three sides?")])
        assert by_css(d, ".answer")[0].text == text_only["text"] and not by_css(d, "#drop img")
        assert "no picture" in by_css(d, '.chart [data-part="CLIP"]')[0].text
        # a bad picture: the server's sentence appears in the page
        d.execute_script("arguments[0].style.display = 'block'", by_css(d, "#file")[0])
        bad = tmp_path / "fake.png"
        bad.write_bytes(b"not a picture at all")
        by_css(d, "#file")[0].send_keys(str(bad))
        until(d, lambda: by_css(d, "#drop img"))
        ask(d, "What is this?")
        assert "not a picture Pillow can read" in by_css(d, "#status")[0].text
    finally:
        server.shutdown()
        server.server_close()


def test_html_in_answers_and_questions_is_shown_as_text(site, browser):
    from selenium.common.exceptions import NoAlertPresentException

    server, _ = serve(Markup, site.demo)
    d = browser
    try:
        d.set_window_size(1200, 900)
        d.get(url(server))
        until(d, lambda: by_css(d, "#examples img"))
        d.execute_script("""window.made = 0;  // elements ever made inside a bubble, while streaming too
new MutationObserver((records) => { for (const r of records) { if (r.target.closest && r.target.closest('.bubble'))
  window.made += [...r.addedNodes].filter((n) => n.nodeType === Node.ELEMENT_NODE).length; } }).observe(
  document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        ask(d, "<b>hello</b> <script>window.pwned = 2</script>")
        assert by_css(d, ".answer")[0].text == Markup.text
        assert by_css(d, ".user .bubble")[0].text == "<b>hello</b> <script>window.pwned = 2</script>"
        assert by_css(d, "#log img, #log script, .bubble b") == []  # no element was made from the text
        time.sleep(0.3)  # an image that failed to load would have fired its onerror by now
        assert d.execute_script("return window.made === 0 && window.pwned === undefined")
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert.text
    finally:
        server.shutdown()
        server.server_close()
