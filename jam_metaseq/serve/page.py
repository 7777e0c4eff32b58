"""The chat page of ``jam serve``: one HTML document and its script, as strings (nothing is read
from disk while serving). Text from the model is put into the page with ``textContent`` only, and
pictures arrive as ``data:`` PNGs, so nothing the model writes runs as markup."""

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>JAM chat</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d9dee7; --user: #e8f0fe; --bot: #f6f7f9; --accent: #2f5bd3; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); display: flex; flex-direction: column;
         height: 100vh; }
  header { display: flex; align-items: center; gap: .75em; padding: .6em 1em; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.05em; margin: 0; }
  header .hint { color: var(--muted); font-size: .85em; flex: 1; }
  #log { flex: 1; overflow-y: auto; padding: 1em; display: flex; flex-direction: column; gap: .8em; }
  .msg { max-width: 46em; padding: .6em .8em; border-radius: 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg.user { background: var(--user); align-self: flex-end; }
  .msg.assistant { background: var(--bot); align-self: flex-start; border: 1px solid var(--line); }
  .msg .who { display: block; font-size: .75em; color: var(--muted); margin-bottom: .2em; }
  .msg img { display: block; width: 192px; height: 192px; image-rendering: pixelated; margin: .4em 0;
             border-radius: 6px; border: 1px solid var(--line); }
  .drawing { width: 192px; height: 192px; margin: .4em 0; border-radius: 6px; border: 1px dashed var(--muted);
             display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: .85em;
             animation: pulse 1.2s ease-in-out infinite; }
  @keyframes pulse { 50% { opacity: .45; } }
  .note { color: var(--muted); font-size: .8em; }
  form { display: flex; gap: .5em; padding: .7em 1em; border-top: 1px solid var(--line); align-items: flex-end; }
  textarea { flex: 1; resize: vertical; min-height: 2.6em; max-height: 12em; font: inherit; padding: .5em;
             border: 1px solid var(--line); border-radius: 8px; }
  button { font: inherit; padding: .5em .9em; border-radius: 8px; border: 1px solid var(--line); background: #fff;
           cursor: pointer; }
  button.primary { background: var(--accent); color: #fff; border-color: var(--accent); }
  button:disabled { opacity: .45; cursor: default; }
  #attached { font-size: .8em; color: var(--muted); align-self: center; }
  #status { min-height: 1.4em; padding: 0 1em .5em; color: #b42318; font-size: .85em; }
</style></head>
<body>
<header><h1>JAM chat</h1><span class="hint">Text and pictures both ways. Enter sends, Shift+Enter is a new line.</span>
  <button id="new" type="button">New conversation</button></header>
<main id="log" aria-live="polite"></main>
<div id="status" role="status"></div>
<form id="form" autocomplete="off">
  <input id="file" type="file" accept="image/*" hidden>
  <button id="pick" type="button" title="Attach a picture to your message">Picture</button>
  <span id="attached"></span>
  <textarea id="text" placeholder="Ask for a picture, or about one" rows="2"></textarea>
  <button id="send" class="primary" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<script src="/app.js"></script>
</body></html>
"""

APP_JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let cid = null;        // this tab's conversation
let busy = false;
let picture = null;    // {b64, url, name} attached to the next message
let maxPicture = 4 * 1024 * 1024;  // the server's limit, from its answer to a new conversation

function status(message) { $("status").textContent = message || ""; }

function setBusy(on) {
  busy = on;
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "jam";
  div.appendChild(who);
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function clearPicture() {
  if (picture) URL.revokeObjectURL(picture.url);
  picture = null;
  $("attached").textContent = "";
  $("file").value = "";
}

async function newConversation() {
  if (busy) await stop();
  if (cid) fetch("/api/conversations/" + cid, {method: "DELETE"}).catch(() => {});
  cid = null;
  $("log").replaceChildren();
  clearPicture();
  status("");
  try {
    const r = await fetch("/api/conversations", {method: "POST"});
    const d = await r.json();
    if (!r.ok) { status(d.error); return; }
    cid = d.id;
    $("pick").hidden = !d.pictures;
    maxPicture = d.max_picture_bytes;
  } catch (e) { status("cannot reach the server: " + e); }
}

async function stop() {
  if (cid) await fetch("/api/conversations/" + cid + "/stop", {method: "POST"}).catch(() => {});
}

async function send(event) {
  if (event) event.preventDefault();
  if (busy) return;
  if (!cid) { status("no conversation: press New conversation"); return; }
  const text = $("text").value;
  if (!text.trim() && !picture) { status("write something or attach a picture"); return; }
  status("");
  const sent = picture;
  const user = bubble("user");
  if (sent) { const img = new Image(); img.alt = sent.name; img.src = sent.url; user.appendChild(img); }
  user.appendChild(document.createTextNode(text));
  const answer = bubble("assistant");
  let textEl = null;
  const drawing = {};
  setBusy(true);
  function handle(ev) {
    if (ev.kind === "text") {
      if (!textEl) { textEl = document.createElement("span"); answer.appendChild(textEl); }
      textEl.textContent += ev.text;
    } else if (ev.kind === "image_start") {
      const ph = document.createElement("div");
      ph.className = "drawing";
      ph.textContent = "drawing a picture\u2026";
      answer.appendChild(ph);
      drawing[ev.index] = ph;
      textEl = null;
    } else if (ev.kind === "image") {
      let el;
      if (ev.png) { el = new Image(); el.alt = "picture " + (ev.index + 1); el.src = ev.png; }
      else { el = document.createElement("pre"); el.textContent = JSON.stringify(ev.codes); }
      if (drawing[ev.index]) drawing[ev.index].replaceWith(el); else answer.appendChild(el);
      textEl = null;
    } else if (ev.kind === "done") {
      for (const ph of Object.values(drawing)) if (ph.isConnected) ph.remove();
      if (ev.finish_reason !== "eot") {
        const note = document.createElement("div");
        note.className = "note";
        note.textContent = ev.finish_reason === "stopped" ? "(stopped)" : "(length limit)";
        answer.appendChild(note);
      }
    } else if (ev.kind === "error") {
      status(ev.message);
    }
    answer.scrollIntoView({block: "end"});
  }
  try {
    const r = await fetch("/api/conversations/" + cid + "/messages", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: text, image: sent ? sent.b64 : null}),
    });
    if (!r.ok) {
      const d = await r.json().catch(() => ({error: r.status + " " + r.statusText}));
      user.remove(); answer.remove();
      status(d.error);
      return;
    }
    $("text").value = "";
    clearPicture();
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (frame.startsWith("data: ")) handle(JSON.parse(frame.slice(6)));
      }
    }
  } catch (e) {
    status("connection lost: " + e);
  } finally {
    setBusy(false);
    $("text").focus();
  }
}

function pick() { $("file").click(); }

function picked() {
  const f = $("file").files[0];
  if (!f) return;
  if (f.size > maxPicture) {
    status("that picture is larger than " + (maxPicture / 1048576).toFixed(1) + " MiB");
    $("file").value = "";
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    clearPicture();
    const url = String(reader.result);
    picture = {b64: url.slice(url.indexOf(",") + 1), url: URL.createObjectURL(f), name: f.name};
    $("attached").textContent = f.name;
    status("");
  };
  reader.onerror = () => status("cannot read that file");
  reader.readAsDataURL(f);
}

$("form").addEventListener("submit", send);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", newConversation);
$("pick").addEventListener("click", pick);
$("file").addEventListener("change", picked);
newConversation();
"""
