// The learner page: say the expected word, hear the attempt back, see which letters were right.
// No inline code or styles (the page's Content-Security-Policy forbids them): widths are set through element.style.
"use strict";

const $ = (id) => document.getElementById(id);

const MAX_SECONDS = 10; // a recording stops itself after this long
const POLL_WAIT_S = 20; // each GET holds until the job is final or this many seconds pass (the API allows 30)
const KEY_STORE = "arabic-words-key";
const MAX_AUTO_RETRY_S = 60; // a busy server's Retry-After up to this long is waited out by the page itself
const NETWORK_GIVE_UP_S = 120; // polling retries a lost connection this long before asking the learner

// Numbers in Arabic-Indic digits, as in a school book.
const NUMBER = new Intl.NumberFormat("ar-u-nu-arab");
const DECIMAL = new Intl.NumberFormat("ar-u-nu-arab", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const PERCENT = new Intl.NumberFormat("ar-u-nu-arab", { style: "percent", maximumFractionDigits: 0 });

// ------------------------------------------------------------------------------------------------ text
// The same normalization as shared/text.py normalize_loose, letter by letter, so that each normalized letter
// remembers the characters it came from (with their vowel marks) for display.
const TASHKEEL = /[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u08d3-\u08ff]/u;
const TATWEEL = "\u0640";
// Zero-width joiners and spaces, bidi marks and controls, soft hyphen: no part of a word, removed (not a space).
const INVISIBLE = /[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/u;
const MARK = /\p{M}/u;
const WORD_CHAR = /[\p{L}\p{N}]/u;
const FOLD = {
  "أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ٲ": "ا", "ٳ": "ا",
  "ک": "ك", "ی": "ي", "ې": "ي", "ە": "ه", "ھ": "ه", "ہ": "ه", "ۀ": "ه",
  "ى": "ي", "ة": "ه", "ؤ": "و", "ئ": "ي",
};

function fold(ch) {
  const code = ch.codePointAt(0);
  if (code >= 0x0660 && code <= 0x0669) return String(code - 0x0660);
  if (code >= 0x06f0 && code <= 0x06f9) return String(code - 0x06f0);
  return FOLD[ch] || ch;
}

// [{shown, key}]: key is the loosely normalized letter (" " between words), shown the original characters.
function letterUnits(text) {
  const units = [];
  const last = () => units[units.length - 1];
  for (const ch of (text || "").normalize("NFKC")) {
    if (INVISIBLE.test(ch)) continue;
    if (TASHKEEL.test(ch) || ch === TATWEEL || MARK.test(ch)) {
      if (units.length && last().key !== " ") last().shown += ch; // a vowel mark stays on its letter
      continue;
    }
    const key = fold(ch);
    if (WORD_CHAR.test(key) && key !== "_") units.push({ shown: ch, key });
    else if (units.length && last().key !== " ") units.push({ shown: " ", key: " " }); // spaces, punctuation
  }
  while (units.length && last().key === " ") units.pop();
  return units;
}

const normalizeLoose = (text) => letterUnits(text).map((u) => u.key).join("");

// This aligns two TEXTS, not audio: the letters of the expected word against the letters of the transcript, by the
// fewest letter edits (Levenshtein). A letter of the expected word is "right" (the same letter heard in its place),
// "wrong" (another letter heard instead) or "missing" (nothing heard for it); letters heard beyond those are
// "extra". It says which letters the transcript differs in, not where in the recording they were said.
function alignLetters(expectedUnits, heardText) {
  const a = expectedUnits.map((u) => u.key);
  const b = Array.from(normalizeLoose(heardText));
  const n = a.length;
  const m = b.length;
  const d = Array.from({ length: n + 1 }, (_, i) => {
    const row = new Array(m + 1).fill(0);
    row[0] = i;
    return row;
  });
  for (let j = 0; j <= m; j++) d[0][j] = j;
  for (let i = 1; i <= n; i++) {
    for (let j = 1; j <= m; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
  }
  const ops = [];
  let i = n;
  let j = m;
  while (i > 0 || j > 0) {
    if (i > 0 && j > 0 && d[i][j] === d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1)) {
      ops.push({ op: a[i - 1] === b[j - 1] ? "right" : "wrong", unit: expectedUnits[i - 1], heard: b[j - 1] });
      i--;
      j--;
    } else if (i > 0 && d[i][j] === d[i - 1][j] + 1) {
      ops.push({ op: "missing", unit: expectedUnits[i - 1] });
      i--;
    } else {
      ops.push({ op: "extra", heard: b[j - 1] });
      j--;
    }
  }
  return ops.reverse();
}

// ------------------------------------------------------------------------------------------------ words
function seconds(n) {
  const s = NUMBER.format(n);
  if (n === 1) return "ثانية واحدة";
  if (n === 2) return "ثانيتان";
  if (n >= 3 && n <= 10) return s + " ثوانٍ";
  return s + " ثانية";
}

const MESSAGES = {
  insecure:
    "لا يسمح المتصفح بالتسجيل في هذه الصفحة لأنها لم تُفتح عبر اتصال آمن (https). " +
    "افتحها عبر https، أو اختر ملفًا صوتيًا.",
  noRecorder: "متصفحك لا يدعم التسجيل من الميكروفون. حدّث المتصفح أو جرّب متصفحًا آخر، أو اختر ملفًا صوتيًا.",
  micDenied:
    "لم يُسمح للصفحة باستخدام الميكروفون. اضغط على رمز القفل أو الميكروفون بجانب عنوان الصفحة واختر «السماح»، " +
    "ثم اضغط «ابدأ التسجيل» مرة أخرى. ويمكنك بدلًا من ذلك اختيار ملف صوتي.",
  micMissing: "لم نجد ميكروفونًا في هذا الجهاز. صِل ميكروفونًا أو سماعة بها ميكروفون، ثم حاول مرة أخرى.",
  micBusy:
    "لا نستطيع الوصول إلى الميكروفون: قد يكون برنامج آخر يستخدمه (مكالمة مثلًا). أغلق ذلك البرنامج ثم حاول مرة أخرى.",
  micOther: "تعذّر تشغيل الميكروفون. أعد تحميل الصفحة ثم حاول مرة أخرى.",
  recorderFailed: "توقّف التسجيل بسبب خطأ في المتصفح. حاول مرة أخرى.",
  emptyRecording: "التسجيل فارغ: لم يصل أي صوت. تأكد أن الميكروفون يعمل، ثم سجّل مرة أخرى.",
  network: "تعذّر الاتصال بالخادم. تحقّق من اتصالك بالإنترنت، ثم اضغط «أعد المحاولة».",
  networkRetry: "انقطع الاتصال بالخادم. نعيد المحاولة تلقائيًا…",
  badAnswer: "وصلنا ردّ غير مفهوم من الخادم. حاول مرة أخرى بعد قليل.",
  busyLong: "الخدمة مشغولة جدًا الآن. حاول مرة أخرى لاحقًا.",
  keyMissing: "هذه الخدمة تحتاج إلى مفتاح دخول. اكتبه في خانة «المفتاح» ثم اضغط «حفظ».",
  keyRevoked:
    "هذا المفتاح لم يعد صالحًا. اطلب مفتاحًا جديدًا من معلّمك أو من المسؤول عن الخدمة، واكتبه في خانة «المفتاح».",
};

const ERROR_MESSAGES = {
  no_file: "لم يصل أي تسجيل إلى الخادم. سجّل مرة أخرى.",
  empty_upload: MESSAGES.emptyRecording,
  upload_too_large: "الملف كبير جدًا. سجّل الكلمة وحدها، أو اختر ملفًا أصغر.",
  unsupported_media_type: "هذا الملف ليس تسجيلًا صوتيًا. اختر ملفًا صوتيًا (مثل WebM أو MP3 أو WAV).",
  invalid_expected: "الكلمة المطلوبة طويلة جدًا. اكتب كلمة أو عبارة قصيرة.",
  not_found: "لم تعد نتيجة هذا التسجيل محفوظة على الخادم. سجّل مرة أخرى.",
  unauthorized: MESSAGES.keyMissing,
  key_revoked: MESSAGES.keyRevoked,
  quota_exceeded: "انتهى ما يُسمح لك بتسجيله اليوم. عُد غدًا لتتدرّب أكثر.",
  audio_too_long: "التسجيل أطول من المسموح. سجّل الكلمة وحدها في ثوانٍ قليلة.",
  upload_expired: "الخدمة مزدحمة ولم نستطع تحليل تسجيلك في الوقت المحدد. حاول مرة أخرى.",
  timeout: "استغرق تحليل التسجيل وقتًا أطول من المسموح. حاول مرة أخرى بتسجيل أقصر.",
  worker_crashed: "حدث خطأ في الخادم أثناء تحليل تسجيلك. حاول مرة أخرى بعد قليل.",
  internal_error: "حدث خطأ في الخادم أثناء تحليل تسجيلك. حاول مرة أخرى بعد قليل.",
  service_unavailable: "الخدمة غير متاحة الآن. حاول مرة أخرى بعد قليل.",
  queue_full: "الخدمة مشغولة جدًا الآن. حاول مرة أخرى بعد قليل.",
  rate_limited: "أرسلت تسجيلات كثيرة في وقت قصير. انتظر قليلًا ثم حاول مرة أخرى.",
  too_many_inflight: "ما زالت تسجيلاتك السابقة قيد التحليل. انتظر قليلًا ثم حاول مرة أخرى.",
};

const AUDIO_REASONS = {
  silent: "التسجيل صامت: لم يصل أي صوت. تأكد أن الميكروفون غير مكتوم، ثم تكلّم بصوت أعلى.",
  zero_length: MESSAGES.emptyRecording,
  truncated: "التسجيل ناقص أو تالف. سجّل مرة أخرى.",
  corrupt: "التسجيل ناقص أو تالف. سجّل مرة أخرى.",
  no_audio_stream: "هذا الملف لا يحتوي على صوت. اختر ملفًا صوتيًا آخر.",
};
const INVALID_AUDIO = "لم نستطع قراءة هذا التسجيل. سجّل مرة أخرى، أو اختر ملفًا صوتيًا آخر (مثل WebM أو MP3 أو WAV).";

function errorText(error, httpStatus) {
  if (!error) return httpStatus >= 500 ? ERROR_MESSAGES.internal_error : MESSAGES.badAnswer;
  if (error.code === "invalid_audio") return AUDIO_REASONS[error.reason] || INVALID_AUDIO;
  return ERROR_MESSAGES[error.code] || "حدث خطأ غير متوقع. حاول مرة أخرى بعد قليل.";
}

function micText(err) {
  const name = (err && err.name) || "";
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return MESSAGES.micDenied;
  }
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
    return MESSAGES.micMissing;
  }
  if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError") return MESSAGES.micBusy;
  return MESSAGES.micOther;
}

// ------------------------------------------------------------------------------------------------ page state
class PageError extends Error {
  constructor(message, code, retry) {
    super(message);
    this.code = code || "";
    this.retry = retry || null; // what "retry" does, if anything
  }
}
class Cancelled extends Error {}

let attempt = 0; // each recording or file is an attempt; a newer one silently ends an older one's requests
let recording = null;
let lastBlobUrl = null;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function setStatus(text, busy) {
  $("status").textContent = text || "";
  $("status").classList.toggle("busy", Boolean(busy));
}

function showError(message, code, retry) {
  setStatus("");
  $("error-text").textContent = message;
  const codeLine = $("error-code");
  codeLine.textContent = "";
  if (code) {
    const label = document.createElement("span");
    label.lang = "ar";
    label.dir = "rtl";
    label.textContent = "رمز الخطأ: ";
    codeLine.append(code, " ", label);
  }
  codeLine.hidden = !code;
  $("retry").hidden = !retry;
  $("retry").onclick = retry;
  $("error").hidden = false;
}

function showHint(text) {
  $("hint").textContent = text || "";
  $("hint").hidden = !text;
}

function clearError() {
  $("error").hidden = true;
  $("retry").onclick = null;
}

function setMeter(fill, meter, fraction) {
  const value = Math.max(0, Math.min(1, fraction));
  fill.style.width = (value * 100).toFixed(1) + "%"; // CSSOM, not a style attribute: allowed by the CSP
  meter.setAttribute("aria-valuenow", String(Math.round(value * 100)));
}

// ------------------------------------------------------------------------------------------------ the word
function expectedText() {
  return $("expected").value.trim();
}

function showWord() {
  const word = expectedText();
  $("word").textContent = word || "اكتب كلمة أدناه، أو سجّل أي كلمة";
  $("word").classList.toggle("placeholder", !word);
  document.title = word ? word + " - تدرّب على النطق" : "تدرّب على نطق الكلمات العربية";
  const url = new URL(window.location.href);
  if (word) url.searchParams.set("word", word);
  else url.searchParams.delete("word");
  window.history.replaceState(null, "", url);
}

// ------------------------------------------------------------------------------------------------ API
function authHeaders() {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

function retryAfterSeconds(response) {
  const value = Number(response.headers.get("Retry-After"));
  return Number.isFinite(value) && value > 0 ? value : 5;
}

const WAITING = {
  rate_limited: "أرسلت تسجيلات كثيرة في وقت قصير.",
  too_many_inflight: "ما زالت تسجيلاتك السابقة قيد التحليل.",
};

async function waitOut(secondsLeft, token, code) {
  const why = WAITING[code] || "الخدمة مشغولة الآن.";
  for (let s = Math.ceil(secondsLeft); s > 0; s--) {
    if (token !== attempt) throw new Cancelled();
    setStatus(why + " نعيد المحاولة تلقائيًا بعد " + seconds(s) + "…", true);
    await sleep(1000);
  }
}

// One API call, with the waits a learner should not have to do: a busy server's Retry-After and (when polling) a
// lost connection. Errors come back as PageError in words; a newer attempt ends this one with Cancelled.
async function api(url, init, token, { retryNetwork }) {
  let offlineSince = null;
  for (let tries = 0; ; tries++) {
    let response;
    try {
      response = await fetch(url, { ...init, headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      if (token !== attempt) throw new Cancelled();
      offlineSince = offlineSince || Date.now();
      if (!retryNetwork || Date.now() - offlineSince > NETWORK_GIVE_UP_S * 1000) {
        throw new PageError(MESSAGES.network, "network");
      }
      setStatus(MESSAGES.networkRetry, true);
      await sleep(Math.min(10000, 1000 * 2 ** Math.min(tries, 4)));
      continue;
    }
    offlineSince = null;
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (token !== attempt) throw new Cancelled();
    const code = body && body.error && body.error.code;
    if (response.status === 401 || response.status === 403) {
      $("key-row").hidden = false;
      $("key").focus();
    }
    if ((response.status === 429 || response.status === 503) && code !== "quota_exceeded") {
      const wait = retryAfterSeconds(response);
      if (wait <= MAX_AUTO_RETRY_S && tries < 6) {
        await waitOut(wait, token, code);
        continue;
      }
    }
    if (!response.ok) {
      throw new PageError(errorText(body && body.error, response.status), code || String(response.status));
    }
    if (!body || typeof body !== "object") throw new PageError(MESSAGES.badAnswer, String(response.status));
    return body;
  }
}

async function transcribe(blob, filename) {
  const token = ++attempt;
  const retry = () => transcribe(blob, filename);
  clearError();
  $("result").hidden = true;
  setStatus("نرسل تسجيلك…", true);
  const form = new FormData();
  form.append("file", blob, filename);
  const expected = expectedText();
  if (expected) form.append("expected", expected);
  try {
    let job = await api("/v1/transcriptions", { method: "POST", body: form }, token, { retryNetwork: false });
    const url = job.url || "/v1/transcriptions/" + encodeURIComponent(job.id); // polls answer without a url
    const poll = async () => {
      // No cap on the number of polls: a job the server accepted always ends, succeeded or failed.
      while (job.status !== "succeeded" && job.status !== "failed") {
        setStatus(job.status === "processing" ? "نستمع إلى تسجيلك…" : "تسجيلك في الانتظار…", true);
        job = await api(url + "?wait=" + POLL_WAIT_S, { method: "GET" }, token, { retryNetwork: true });
      }
      if (job.status === "failed") {
        throw new PageError(errorText(job.error, 200), job.error && (job.error.reason || job.error.code), retry);
      }
      setStatus("");
      showResult(job.result);
    };
    await resumable(poll, token);
  } catch (err) {
    if (err instanceof Cancelled) return;
    if (err instanceof PageError) showError(err.message, err.code, err.retry || retry);
    else showError(MESSAGES.badAnswer, err && err.name, retry);
  }
}

// Polling that lost its connection for good resumes where it was (the same job) when the learner retries.
async function resumable(poll, token) {
  try {
    await poll();
  } catch (err) {
    if (err instanceof PageError && err.code === "network" && !err.retry) {
      err.retry = () => {
        clearError();
        resumable(poll, token).catch((e) => e instanceof PageError && showError(e.message, e.code, e.retry));
      };
    }
    throw err;
  }
}

// ------------------------------------------------------------------------------------------------ the result
// How sure the model is of the transcript (its weakest word's probability), in a word a learner reads at a glance.
function describeConfidence(c) {
  const percent = " (" + PERCENT.format(c) + ")";
  if (c >= 0.8) return { level: "high", text: "عالية" + percent };
  if (c >= 0.5) return { level: "mid", text: "متوسطة" + percent };
  return { level: "low", text: "منخفضة" + percent + ": قد لا يكون ما سمعناه دقيقًا" };
}

const OP_WORDS = { right: "صحيح", wrong: "خطأ", missing: "لم نسمعه", extra: "زائد" };

function letterNote(op) {
  if (op.op === "wrong") return "الحرف «" + op.unit.shown + "»: سمعنا بدلًا منه «" + op.heard + "».";
  if (op.op === "missing") return "الحرف «" + op.unit.shown + "»: لم نسمعه.";
  if (op.op === "extra") return "سمعنا حرفًا زائدًا: «" + op.heard + "».";
  return "";
}

function showLetters(expected, heard) {
  const ops = alignLetters(letterUnits(expected), heard);
  const word = $("word-marked");
  const tiles = $("letters");
  const notes = $("notes");
  word.textContent = "";
  tiles.textContent = "";
  notes.textContent = "";
  for (const op of ops) {
    if ((op.unit && op.unit.key === " ") || (op.op === "extra" && op.heard === " ")) {
      if (op.unit) word.append(" ");
      continue; // the gap between two words is not a letter to mark
    }
    const shown = op.unit ? op.unit.shown : op.heard;
    const span = document.createElement("span");
    span.className = "letter " + op.op;
    span.textContent = shown;
    span.title = OP_WORDS[op.op];
    word.append(span);

    const tile = document.createElement("li");
    tile.className = "tile " + op.op;
    const glyph = document.createElement("span");
    glyph.className = "glyph";
    glyph.textContent = shown;
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = OP_WORDS[op.op];
    tile.append(glyph, mark);
    tiles.append(tile);

    const note = letterNote(op);
    if (note) {
      const li = document.createElement("li");
      li.textContent = note;
      notes.append(li);
    }
  }
  return ops;
}

function showResult(result) {
  const heard = (result && result.text) || "";
  const expected = result && result.expected;
  const verdict = $("verdict");
  $("heard").textContent = heard || "لا شيء";
  $("letters-block").hidden = !expected;
  const ops = expected ? showLetters(expected.text, heard) : [];
  const wrongLetters = ops.filter((op) => op.op !== "right" && !(op.op === "extra" && op.heard === " ")).length;
  let kind = "neutral";
  if (!heard) {
    kind = "wrong";
    verdict.textContent = "لم نسمع كلامًا واضحًا. اقترب من الميكروفون وتكلّم بصوت أوضح، ثم حاول مرة أخرى.";
  } else if (!expected) {
    verdict.textContent = "هذا ما سمعناه:";
  } else if (expected.normalized_match) {
    kind = "right";
    verdict.textContent = "أحسنت! نطقت «" + expected.text + "» صحيحًا.";
  } else if (expected.similarity >= 0.5) {
    kind = "close";
    verdict.textContent =
      "قريب! " +
      (wrongLetters === 1 ? "حرف واحد يحتاج إلى تصحيح" : "بعض الحروف تحتاج إلى تصحيح") +
      ": انظر إلى الحروف المعلّمة، ثم حاول مرة أخرى.";
  } else {
    kind = "wrong";
    verdict.textContent = "لم نسمع الكلمة المطلوبة. استمع إلى تسجيلك، ثم حاول مرة أخرى.";
  }
  verdict.className = "verdict " + kind;

  const confidence = Number((result && result.confidence) || 0);
  const described = describeConfidence(confidence);
  setMeter($("confidence-fill"), $("confidence"), confidence);
  $("confidence").className = "meter confidence " + described.level;
  $("confidence-text").textContent = described.text;

  const timings = $("timings");
  timings.textContent = "";
  for (const w of (result && result.words) || []) {
    const li = document.createElement("li");
    const word = document.createElement("span");
    word.className = "timing-word";
    word.textContent = w.word;
    li.append(word, " من الثانية " + DECIMAL.format(w.start) + " إلى " + DECIMAL.format(w.end));
    timings.append(li);
  }
  if (result && result.duration_s) {
    const li = document.createElement("li");
    li.className = "timing-total";
    li.textContent = "طول التسجيل كله: " + DECIMAL.format(result.duration_s) + " ثانية";
    timings.append(li);
  }
  $("timings-block").hidden = !timings.childElementCount;
  $("result").hidden = false;
  $("result").dataset.verdict = kind;
  verdict.focus({ preventScroll: true });
  $("result").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// ------------------------------------------------------------------------------------------------ recording
function pickMimeType() {
  const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4", "audio/webm"];
  return types.find((t) => MediaRecorder.isTypeSupported && MediaRecorder.isTypeSupported(t)) || "";
}

function extensionFor(mimeType) {
  if (mimeType.includes("ogg")) return "ogg";
  if (mimeType.includes("mp4") || mimeType.includes("aac")) return "m4a";
  return "webm";
}

function setRecordingUi(on) {
  $("rec").classList.toggle("recording", on);
  $("rec").setAttribute("aria-pressed", on ? "true" : "false");
  $("rec-label").textContent = on ? "أوقف التسجيل" : "ابدأ التسجيل";
  $("level-meter").classList.toggle("live", on);
  if (!on) {
    setMeter($("level-fill"), $("level-meter"), 0);
    $("level-meter").classList.remove("loud");
  }
}

function showPlayback(blob) {
  if (lastBlobUrl) URL.revokeObjectURL(lastBlobUrl);
  lastBlobUrl = URL.createObjectURL(blob);
  $("playback").src = lastBlobUrl;
  $("playback").dataset.type = blob.type; // what was recorded (or picked) and sent, e.g. audio/webm;codecs=opus
  $("playback").dataset.bytes = String(blob.size);
  $("playback-row").hidden = false;
}

async function startRecording() {
  clearError();
  showHint("");
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError(MESSAGES.insecure);
    return;
  }
  if (typeof MediaRecorder === "undefined") {
    showError(MESSAGES.noRecorder);
    return;
  }
  attempt++; // whatever was still waiting for a result is no longer shown
  $("rec").disabled = true;
  setStatus("نطلب الإذن باستخدام الميكروفون…");
  // Made now, within the click: an AudioContext made after the permission prompt may start suspended (silent meter).
  let audio = null;
  try {
    audio = new (window.AudioContext || window.webkitAudioContext)();
  } catch (err) {
    audio = null; // no level meter; the recording still works
  }
  let stream;
  try {
    // Raw capture: the browser's echo cancellation, noise suppression and automatic gain change the sound of a
    // single word (clipping, extra letters heard), so all three are off.
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
  } catch (err) {
    if (audio) audio.close().catch(() => {});
    setStatus("");
    showError(micText(err), err && err.name);
    return;
  } finally {
    $("rec").disabled = false;
  }

  const mimeType = pickMimeType();
  let recorder;
  try {
    recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop());
    if (audio) audio.close().catch(() => {});
    showError(MESSAGES.noRecorder, err && err.name);
    return;
  }
  const chunks = [];
  const state = { recorder, stream, started: performance.now(), peak: 0, level: 0, timers: [], audio, metered: false };
  recording = state;

  // The level meter: the loudest sample of each 50 ms, in dB from -60 (empty bar) to 0 dBFS (full, red).
  try {
    if (!audio) throw new Error("no Web Audio");
    if (audio.state === "suspended") audio.resume().catch(() => {});
    const analyser = audio.createAnalyser();
    analyser.fftSize = 2048;
    audio.createMediaStreamSource(stream).connect(analyser); // not to the speakers: no echo
    const samples = new Float32Array(analyser.fftSize);
    state.timers.push(
      setInterval(() => {
        if (audio.state !== "running") return;
        state.metered = true;
        analyser.getFloatTimeDomainData(samples);
        let peak = 0;
        for (const s of samples) peak = Math.max(peak, Math.abs(s));
        state.peak = Math.max(state.peak, peak);
        const db = 20 * Math.log10(Math.max(peak, 1e-6));
        state.level = Math.max((db + 60) / 60, state.level * 0.85);
        setMeter($("level-fill"), $("level-meter"), state.level);
        $("level-meter").classList.toggle("loud", peak >= 0.98);
      }, 50),
    );
  } catch (err) {
    state.metered = false; // no meter, the recording still works
  }

  const tick = () => {
    const elapsed = (performance.now() - state.started) / 1000;
    const left = Math.max(0, Math.ceil(MAX_SECONDS - elapsed));
    $("timer").textContent = "يتبقى " + seconds(left);
    $("timer").classList.toggle("ending", left <= 3);
    if (elapsed >= MAX_SECONDS) stopRecording();
  };
  state.timers.push(setInterval(tick, 100));
  tick();

  recorder.ondataavailable = (e) => {
    if (e.data && e.data.size) chunks.push(e.data);
  };
  recorder.onerror = () => {
    finishRecording(state);
    showError(MESSAGES.recorderFailed);
  };
  recorder.onstop = () => {
    finishRecording(state);
    const blob = new Blob(chunks, { type: recorder.mimeType || mimeType || "audio/webm" });
    if (!blob.size) {
      showError(MESSAGES.emptyRecording);
      return;
    }
    showPlayback(blob);
    if (state.metered && state.peak >= 0.98) {
      showHint("كان صوتك مرتفعًا جدًا حتى تشوّه. ابتعد قليلًا عن الميكروفون في المرة القادمة.");
    } else if (state.metered && state.peak < 0.01) {
      showHint("كان صوتك ضعيفًا جدًا. اقترب من الميكروفون في المرة القادمة.");
    }
    transcribe(blob, "recording." + extensionFor(blob.type));
  };
  try {
    recorder.start();
  } catch (err) {
    finishRecording(state);
    showError(MESSAGES.recorderFailed, err && err.name);
    return;
  }
  setRecordingUi(true);
  setStatus("نسجّل الآن… قل الكلمة ثم اضغط «أوقف التسجيل».");
}

function finishRecording(state) {
  state.timers.forEach((t) => clearInterval(t));
  state.stream.getTracks().forEach((t) => t.stop());
  if (state.audio) state.audio.close().catch(() => {});
  if (recording === state) recording = null;
  setRecordingUi(false);
  $("timer").textContent = seconds(MAX_SECONDS) + " كحدٍّ أقصى";
  $("timer").classList.remove("ending");
}

function stopRecording() {
  if (recording && recording.recorder.state === "recording") recording.recorder.stop();
}

// ------------------------------------------------------------------------------------------------ wiring
$("rec").addEventListener("click", () => {
  if (recording) stopRecording();
  else startRecording();
});

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  if (recording) stopRecording();
  showPlayback(file);
  transcribe(file, file.name || "recording");
  $("file").value = "";
  showHint("");
});

$("expected").addEventListener("input", showWord);

$("save-key").addEventListener("click", () => {
  const key = $("key").value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORE, key);
  $("key").value = "";
  $("key-row").hidden = true;
  const retry = $("retry").onclick;
  clearError();
  if (retry) retry();
});

(function init() {
  const word = new URLSearchParams(window.location.search).get("word");
  if (word) $("expected").value = word.trim().slice(0, 500);
  showWord();
})();
