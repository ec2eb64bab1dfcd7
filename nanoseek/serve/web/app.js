// The nanoseek chat page: streams /v1/chat/completions, shows the thinking (reasoning_content) in a block that is
// open while the model thinks and folds to "Thought for N s" once the answer starts, a stop button, and tokens/s.
// The history sent back holds only the answers: earlier thinking is never sent (the DeepSeek API rejects it).
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // [{role, content}] with the thinking stripped
let controller = null; // AbortController of the reply being streamed

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; // textContent only: model output is never parsed as HTML
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const j = await r.json();
    if (r.ok) {
      window.nanoseekModel = j.data[0].id;
      $("model").textContent = `${j.data[0].id} · context ${j.data[0].max_model_len}`;
    } else {
      $("model").textContent = j.error ? j.error.message : r.statusText;
    }
  } catch (e) {
    $("model").textContent = String(e);
  }
}

// Server-sent events from a fetch body: yields the parsed JSON of each `data:` line until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  if (text !== undefined) m.textContent = text;
  $("log").appendChild(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant");
  msg.dataset.state = "streaming";
  const think = el("details", "think");
  think.open = true;
  const summary = el("summary", null, "Thinking…");
  const thinkBody = el("div", "think-body");
  think.append(summary, thinkBody);
  think.hidden = true;
  const answer = el("div", "answer");
  const stats = el("div", "stats");
  msg.append(think, answer, stats);

  const body = {
    model: window.nanoseekModel,
    messages: history.slice(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
  };
  const maxTokens = parseInt($("max_tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;

  const t0 = performance.now();
  let tFirst = null, tThinkEnd = null, chunks = 0, usage = null, answerText = "";
  const foldThinking = () => {
    if (tThinkEnd !== null) return;
    tThinkEnd = performance.now();
    summary.textContent = `Thought for ${((tThinkEnd - (tFirst ?? t0)) / 1000).toFixed(1)} s`;
    think.open = false;
  };
  controller = new AbortController();
  setBusy(true);
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error(j.error ? j.error.message : `${r.status} ${r.statusText}`);
    }
    for await (const chunk of sse(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const d = choice.delta || {};
        if (d.reasoning_content) {
          tFirst ??= performance.now();
          think.hidden = false;
          thinkBody.textContent += d.reasoning_content;
          chunks++;
        }
        if (d.content) {
          tFirst ??= performance.now();
          if (!think.hidden) foldThinking();
          answerText += d.content;
          answer.textContent = answerText.replace(/^\s+/, ""); // shown without the newline after </think>
          chunks++;
        }
        if (choice.finish_reason) msg.dataset.finishReason = choice.finish_reason;
      }
      msg.scrollIntoView({ block: "end" });
    }
    msg.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      msg.dataset.state = "stopped";
    } else {
      msg.dataset.state = "error";
      answer.append(el("div", "error", String(e.message || e)));
    }
  } finally {
    controller = null;
    setBusy(false);
    if (!think.hidden) foldThinking();
    const tEnd = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = (tEnd - (tFirst ?? tEnd)) / 1000;
    const rate = secs > 0 ? (tokens / secs).toFixed(1) : "–";
    msg.dataset.tokens = String(tokens);
    stats.textContent = `${tokens} tokens · ${rate} tokens/s` + (msg.dataset.state === "stopped" ? " · stopped" : "");
    // Only the answer goes back into the conversation, never the thinking. A reply stopped (or failed) before any
    // answer takes its question back out, so the next question does not follow an unanswered one.
    if (answerText) history.push({ role: "assistant", content: answerText });
    else history.pop();
    $("input").focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
});
$("api_key").value = localStorage.getItem("nanoseek_api_key") || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem("nanoseek_api_key", $("api_key").value.trim());
  loadModel();
});
loadModel();
