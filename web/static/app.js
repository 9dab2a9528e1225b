const $ = (id) => document.getElementById(id);
let recorder = null;

// When the server requires an API key, the page asks for one once and keeps it in this browser only.
function authHeaders() {
  const key = localStorage.getItem("arabic-words-key");
  return key ? { Authorization: "Bearer " + key } : {};
}

$("save-key").onclick = () => {
  localStorage.setItem("arabic-words-key", $("key").value.trim());
  $("key-row").hidden = true;
  $("meta").textContent = "";
};

async function send(blob) {
  $("text").textContent = "…"; $("meta").textContent = ""; $("meta").className = "";
  const form = new FormData();
  form.append("file", blob, "recording");
  if ($("expected").value.trim()) form.append("expected", $("expected").value.trim());
  let r = await fetch("/v1/transcriptions", { method: "POST", body: form, headers: authHeaders() });
  let body = await r.json();
  if (!r.ok) return show(body);
  for (let i = 0; i < 10 && !["succeeded", "failed"].includes(body.status); i++) {
    r = await fetch(body.url + "?wait=10", { headers: authHeaders() }); body = await r.json();
    if (!r.ok) return show(body);
  }
  show(body);
}

function show(body) {
  if (body.error && ["unauthorized", "key_revoked"].includes(body.error.code)) $("key-row").hidden = false;
  if (body.error) {
    $("text").textContent = "";
    $("meta").className = "err";
    $("meta").textContent = body.error.code + ": " + body.error.message;
    return;
  }
  const res = body.result;
  $("text").textContent = res.text || "(لا كلام)";
  $("meta").textContent = JSON.stringify({ confidence: res.confidence, expected: res.expected,
    words: res.words, timings_ms: res.timings_ms }, null, 1);
}

$("rec").onclick = async () => {
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    $("rec").textContent = "● تسجيل";
    send(new Blob(chunks, { type: recorder.mimeType }));
  };
  recorder.start();
  $("rec").textContent = "■ إيقاف";
};
$("file").onchange = () => { if ($("file").files[0]) send($("file").files[0]); };
