"""The learner page (web/static/index.html, app.js, app.css): say a word into the browser's microphone (WebM/Opus via
MediaRecorder) or pick a file, hear it back, and see the verdict letter by letter. Tested in real headless Chromium by
tests/test_page_browser.py."""

from flask import Blueprint, current_app

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return current_app.send_static_file("index.html")
