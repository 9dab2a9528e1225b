"""The learner page (web/static) in a real headless Chromium, end to end: a fake microphone fed from a WAV of the
word, the page's MediaRecorder WebM/Opus upload to the real web app (a threaded HTTP server on a free port) and a real
Celery worker, and the verdict shown letter by letter. A denied microphone must give an Arabic message.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing) and the `selenium` package
(the `dev` extra); without them the module is skipped with that reason. SAVE_PAGE_SCREENSHOT=1 also writes the
screenshot to docs/page.png (the README's picture of the page).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from shared.text import normalize_loose
from tests.conftest import serve_http

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

ROOT = Path(__file__).parent.parent
# The fake microphone's sound: kitab.wav downmixed, resampled to 48 kHz (soxr) and padded with 0.5 s of silence either
# side, 16-bit mono (the format Chromium's fake capture plays as it is).
VOICE = Path(__file__).parent / "data" / "page-voice.wav"
WORD = "كِتَاب"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does it)"
    return ""


pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(_missing()), reason=f"browser test: {_missing()}")]

# Collects every Content-Security-Policy violation from the first moment of each page (a script added through the
# DevTools protocol is not subject to the page's CSP).
CSP_PROBE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture(scope="module")
def base_url(app):
    """The session's web app (the `worker` fixture's queue)."""
    with serve_http(app) as url:
        yield url


def make_browser(log_dir: Path, *, microphone: bool) -> webdriver.Chrome:
    """Headless Chromium whose microphone plays VOICE once; ``microphone=False`` denies it instead."""
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--lang=ar",
        "--window-size=412,915",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={VOICE}%noloop",
        "--use-fake-ui-for-media-stream" if microphone else "--deny-permission-prompts",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log_dir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_PROBE})
    # A phone's screen: 412 CSS pixels wide.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 412, "height": 915, "deviceScaleFactor": 2, "mobile": True}
    )
    return driver


@pytest.fixture()
def browser(tmp_path):
    drivers = []

    def start(*, microphone: bool = True) -> webdriver.Chrome:
        drivers.append(make_browser(tmp_path, microphone=microphone))
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.quit()


def page_problems(driver) -> list[str]:
    """CSP violations and console errors (an uncaught exception, a blocked style or script) of the page so far."""
    problems = list(driver.execute_script("return window.__cspViolations || []"))
    for entry in driver.get_log("browser"):
        if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]:
            problems.append(entry["message"])
    return problems


def full_page_png(driver) -> bytes:
    import base64

    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
    )
    return base64.b64decode(shot["data"])


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def test_record_upload_and_verdict_in_chromium(worker, base_url, browser, tmp_path):
    driver = browser()
    driver.get(f"{base_url}/?word={quote(WORD)}")
    assert driver.find_element(By.ID, "word").text == WORD
    assert driver.execute_script("return document.documentElement.dir") == "rtl"
    assert driver.title.startswith(WORD)

    driver.find_element(By.ID, "rec").click()
    WebDriverWait(driver, 10).until(lambda d: "recording" in d.find_element(By.ID, "rec").get_attribute("class"))
    assert driver.find_element(By.ID, "rec-label").text == "أوقف التسجيل"
    # The fake microphone plays VOICE once: 0.5 s of silence, the word, 0.5 s of silence. Stop once the level meter
    # has risen and fallen back (the word is over), as a learner would.
    level, loud_at, started = 0, None, time.monotonic()
    while time.monotonic() - started < 6:
        now = int(driver.find_element(By.ID, "level-meter").get_attribute("aria-valuenow"))
        level = max(level, now)
        if now > 25:  # above -45 dBFS
            loud_at = time.monotonic()
        elif loud_at and level > 50 and time.monotonic() - loud_at > 0.5:
            break
        time.sleep(0.05)
    timer = driver.find_element(By.ID, "timer").text
    driver.find_element(By.ID, "rec").click()
    assert level > 50, "the level meter never moved"
    assert timer.startswith("يتبقى"), timer

    try:
        WebDriverWait(driver, 45).until(lambda d: visible(d, "result") or visible(d, "error"))
    except TimeoutException:
        pytest.fail(f"no result on the page; status: {driver.find_element(By.ID, 'status').text!r}")
    assert not visible(driver, "error"), driver.find_element(By.ID, "error").text
    assert driver.find_element(By.ID, "heard").text == "كتاب"
    assert driver.find_element(By.ID, "result").get_attribute("data-verdict") == "right"
    assert driver.find_element(By.ID, "verdict").text.startswith("أحسنت")
    tiles = driver.find_elements(By.CSS_SELECTOR, "#letters .tile")
    assert [t.get_attribute("class") for t in tiles] == ["tile right"] * 4
    assert [t.find_element(By.CLASS_NAME, "glyph").text for t in tiles] == ["كِ", "تَ", "ا", "ب"]
    marked = driver.find_elements(By.CSS_SELECTOR, "#word-marked .letter")
    assert {m.get_attribute("class") for m in marked} == {"letter right"}
    assert driver.find_element(By.ID, "word-marked").text == WORD
    assert driver.find_elements(By.CSS_SELECTOR, "#notes li") == []
    confidence = int(driver.find_element(By.ID, "confidence").get_attribute("aria-valuenow"))
    fill = driver.execute_script("return document.getElementById('confidence-fill').style.width")
    assert confidence > 0 and fill == f"{float(fill[:-1]):.1f}%" and float(fill[:-1]) > 0
    assert driver.find_element(By.ID, "confidence-text").text.startswith(("عالية", "متوسطة", "منخفضة"))
    assert "كتاب" in driver.find_element(By.ID, "timings").text

    src = driver.find_element(By.ID, "playback").get_attribute("src")
    assert src.startswith("blob:")
    playback = driver.find_element(By.ID, "playback")  # the blob itself: connect-src 'self' forbids fetching it
    assert playback.get_attribute("data-type") == "audio/webm;codecs=opus"
    assert int(playback.get_attribute("data-bytes")) > 1000

    assert page_problems(driver) == []
    png = full_page_png(driver)
    (tmp_path / "page.png").write_bytes(png)
    if os.environ.get("SAVE_PAGE_SCREENSHOT") == "1":
        (ROOT / "docs" / "page.png").write_bytes(png)


def test_denied_microphone_typed_word_and_letter_marks(base_url, browser):
    driver = browser(microphone=False)
    driver.get(base_url + "/")
    assert driver.find_element(By.ID, "word").get_attribute("class") == "word placeholder"
    driver.find_element(By.ID, "rec").click()
    WebDriverWait(driver, 10).until(lambda d: visible(d, "error"))
    message = driver.find_element(By.ID, "error-text").text
    assert "لم يُسمح للصفحة باستخدام الميكروفون" in message, message
    assert "NotAllowedError" in driver.find_element(By.ID, "error-code").text
    assert "recording" not in driver.find_element(By.ID, "rec").get_attribute("class")

    driver.find_element(By.ID, "expected").send_keys("مَدْرَسَة")
    assert driver.find_element(By.ID, "word").text == "مَدْرَسَة"
    assert "word=" in driver.current_url

    # The page's normalization is shared/text.py's normalize_loose.
    samples = ["كِتَابٌ", "أَإِآٱ", "مدرسة", "مستشفى", "سُؤَال", "قـــلم", "رئيس", "ﻻ", "صَبَاحُ  الخَيْر!", "٣ کتاب"]
    samples += ["كِ\u200cتاب", "\u200fمرحبا\u202c"]  # invisible joiners and bidi controls
    js = driver.execute_script("return arguments[0].map(normalizeLoose)", samples)
    assert js == [normalize_loose(s) for s in samples]

    # One wrong letter: the verdict says close, the last letter is marked wrong and named in words.
    fake = {
        "text": "كتاف",
        "confidence": 0.42,
        "duration_s": 1.5,
        "words": [{"word": "كتاف", "start": 0.4, "end": 1.0, "confidence": 0.42}],
        "expected": {"text": "كِتَاب", "normalized_match": False, "similarity": 0.75},
    }
    driver.execute_script(f"showResult({json.dumps(fake, ensure_ascii=False)})")
    tiles = driver.find_elements(By.CSS_SELECTOR, "#letters .tile")
    assert [t.get_attribute("class").split()[1] for t in tiles] == ["right", "right", "right", "wrong"]
    assert driver.find_element(By.ID, "result").get_attribute("data-verdict") == "close"
    assert "«ف»" in driver.find_element(By.ID, "notes").text
    assert "low" in driver.find_element(By.ID, "confidence").get_attribute("class")
    ops = driver.execute_script("return alignLetters(letterUnits('كِتَاب'), 'كتب').map((o) => o.op)")
    assert ops == ["right", "right", "missing", "right"]
    ops = driver.execute_script("return alignLetters(letterUnits('شكرا'), 'شكررا').map((o) => o.op)")
    assert sorted(ops) == ["extra", "right", "right", "right", "right"]
    assert page_problems(driver) == []


# A stand-in for the API inside the page: the upload is refused once as busy (429 with Retry-After), the first poll
# loses its connection, then the job stays "processing" for twelve polls (more than any fixed cap) before it succeeds.
FAKE_API = """
const answers = [
  [429, {error: {code: "queue_full", message: "busy"}}, {"Retry-After": "1"}],
  [202, {id: "j", status: "queued", url: "/v1/transcriptions/j"}],
  "offline",
  ...Array(12).fill([200, {id: "j", status: "processing"}]),
  [200, {id: "j", status: "succeeded", result: {text: "شكرا", confidence: 0.9, duration_s: 1, words: [],
    expected: {text: "شُكْرًا", normalized_match: true, similarity: 1}}}],
];
window.__requests = [];
window.__statuses = [];
new MutationObserver(() => window.__statuses.push(document.getElementById("status").textContent))
  .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
window.fetch = async (url, init) => {
  window.__requests.push(init.method + " " + url);
  const answer = answers.shift();
  if (answer === "offline") throw new TypeError("Failed to fetch");
  const [status, body, headers] = answer;
  return new Response(JSON.stringify(body), {status, headers: {"Content-Type": "application/json", ...headers}});
};
document.getElementById("expected").value = "شُكْرًا";
transcribe(new Blob(["x"], {type: "audio/webm"}), "recording.webm");
"""


def test_busy_server_lost_connection_and_long_waits_are_retried(base_url, browser):
    driver = browser(microphone=False)
    driver.get(base_url + "/")
    driver.execute_script(FAKE_API)
    WebDriverWait(driver, 15).until(lambda d: visible(d, "result") or visible(d, "error"))
    assert not visible(driver, "error"), driver.find_element(By.ID, "error").text
    assert driver.find_element(By.ID, "result").get_attribute("data-verdict") == "right"
    requests = driver.execute_script("return window.__requests")
    assert requests[:2] == ["POST /v1/transcriptions"] * 2
    assert requests[2:] == ["GET /v1/transcriptions/j?wait=20"] * 14
    statuses = driver.execute_script("return window.__statuses")
    assert "الخدمة مشغولة الآن. نعيد المحاولة تلقائيًا بعد ثانية واحدة…" in statuses
    assert "انقطع الاتصال بالخادم. نعيد المحاولة تلقائيًا…" in statuses
    assert "نستمع إلى تسجيلك…" in statuses


def test_a_file_that_is_not_audio_is_explained(base_url, browser, tmp_path):
    driver = browser(microphone=False)
    driver.get(base_url + "/")
    assert driver.find_element(By.CSS_SELECTOR, "label[for=file]").text == "أو اختر ملفًا صوتيًا"
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("these are not sounds\n" * 20)
    driver.find_element(By.ID, "file").send_keys(str(not_audio))
    WebDriverWait(driver, 15).until(lambda d: visible(d, "error"))
    assert driver.find_element(By.ID, "error-text").text.startswith("لم نستطع قراءة هذا التسجيل")
    assert "invalid_audio" in driver.find_element(By.ID, "error-code").text
    assert visible(driver, "retry")
    assert not visible(driver, "result")


# Remembers the id of the job the page's upload created (the page itself keeps it to itself).
WATCH_UPLOADS = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  if (init.method === "POST" && response.status === 202) window.__jobId = (await response.clone().json()).id;
  return response;
};
"""


def test_a_server_that_wants_a_key_gets_one_and_the_upload_goes_on(redis_url, browser):
    """AUTH_MODE=required: the upload is refused (401), the page asks for a key in Arabic, keeps it and retries."""
    import redis as redis_lib

    from shared.access import KeyStore, Limits
    from shared.config import Settings
    from web import create_app, services

    db = redis_url.rsplit("/", 1)[0] + "/13"  # a database of its own (0-3, 5-8 and 11 are other tests')
    redis_lib.Redis.from_url(db).flushdb()
    app = create_app(Settings(REDIS_URL=db, QUEUE="page-auth-test", AUTH_MODE="required"))
    key = KeyStore(services(app).store.redis).create("learner", Limits())[1]
    with serve_http(app) as url:
        driver = browser(microphone=False)
        driver.get(url + "/")
        driver.execute_script(WATCH_UPLOADS)
        driver.find_element(By.ID, "file").send_keys(str(VOICE.with_name("kitab.webm")))
        WebDriverWait(driver, 15).until(lambda d: visible(d, "error"))
        assert driver.find_element(By.ID, "error-text").text.startswith("هذه الخدمة تحتاج إلى مفتاح دخول")
        assert visible(driver, "key-row")

        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "save-key").click()  # saving the key retries the upload
        WebDriverWait(driver, 15).until(lambda d: d.execute_script("return window.__jobId"))
        assert not visible(driver, "key-row") and not visible(driver, "error")
        assert driver.execute_script("return localStorage.getItem('arabic-words-key')") == key
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "status").text == "تسجيلك في الانتظار…")

        job_id = driver.execute_script("return window.__jobId")  # no worker on this queue: finish it as one would
        store = services(app).store
        assert store.claim(job_id, "page-test:1").outcome.value == "claimed"
        result = {"text": "كتاب", "confidence": 0.97, "duration_s": 1.35, "words": []}
        assert store.succeed(job_id, result)
        WebDriverWait(driver, 15).until(lambda d: visible(d, "result"))
        assert driver.find_element(By.ID, "heard").text == "كتاب"
        assert driver.find_element(By.ID, "verdict").text == "هذا ما سمعناه:"  # no expected word: no letters
        assert not visible(driver, "letters-block")
        problems = page_problems(driver)  # the browser logs the refused upload's 401, and nothing else
        assert len(problems) == 1 and "status of 401" in problems[0], problems
