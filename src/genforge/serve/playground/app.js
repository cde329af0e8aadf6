// The genforge playground: a page over the server's own OpenAI-compatible API.
// Everything the server sends is put in the page as text (textContent), never as markup,
// so a model's output cannot inject script. The API key lives in this tab's sessionStorage
// and goes out only as an Authorization header.
"use strict";

const KEY_STORAGE = "genforge.playground.apiKey";
const $ = (id) => document.getElementById(id);

// -- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// An error response in OpenAI's shape ({"error": {"message", ...}}) as one readable line.
async function errorText(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  let hint = "";
  if (response.status === 401) hint = " — enter the server's API key at the top of the page";
  return `${response.status}: ${message}${hint}`;
}

async function api(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// -- tabs, key and models --------------------------------------------------------------------

const loaders = {};

function showPanel(name) {
  for (const tab of document.querySelectorAll("#tabs button")) {
    const selected = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(selected));
    $("panel-" + tab.dataset.panel).hidden = !selected;
  }
  if (loaders[name]) loaders[name]();
}

function updateKeyStatus() {
  const has = apiKey() !== "";
  $("key-status").textContent = has ? "key set for this tab" : "no key";
  $("key-forget").hidden = !has;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const list = await api("/v1/models");
    select.replaceChildren();
    // Generation models carry max_model_len; embedding models do not and cannot chat.
    for (const card of list.data.filter((m) => m.max_model_len !== undefined)) {
      select.append(el("option", { value: card.id, text: card.id }));
    }
    if (previous) select.value = previous;
    showError($("global-error"), "");
  } catch (err) {
    showError($("global-error"), "Could not list the models: " + err.message);
  }
}

function setKey() {
  const input = $("api-key");
  const key = input.value.trim();
  input.value = "";  // kept in sessionStorage only, not left in the field
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  updateKeyStatus();
  loadModels();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  updateKeyStatus();
  loadModels();
}

// -- chat --------------------------------------------------------------------------------------

let conversation = [];
let controller = null;

// Server-sent events: "data: {json}" lines, events separated by a blank line, "[DONE]" last.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function chatBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const settings = { temperature: numberOf("temperature"), top_p: numberOf("top-p"), max_tokens: numberOf("max-tokens"), seed: numberOf("seed") };
  for (const [name, value] of Object.entries(settings)) if (value !== null) body[name] = value;
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (err) {
      throw new Error("the tools are not valid JSON: " + err.message);
    }
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

function addMessage(role, text) {
  const content = el("div", { class: "content", text });
  const message = el("div", { class: "message " + role }, el("div", { class: "role", text: role }), content);
  $("transcript").append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

function renderToolCalls(message, calls) {
  let box = message.querySelector(".tool-calls");
  if (!box) {
    box = el("div", { class: "tool-calls" });
    message.append(box);
  }
  box.replaceChildren();
  for (const call of calls) {
    let args = call.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (_) { /* still streaming, or not JSON */ }
    box.append(el("div", { class: "tool-call" },
      el("div", { class: "tool-name", text: "tool call: " + call.name }),
      el("pre", { class: "tool-arguments", text: args })));
  }
}

async function sendChat(event) {
  event.preventDefault();
  if (controller) return;
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  showError($("chat-error"), "");
  let body;
  conversation.push({ role: "user", content: text });
  try {
    body = chatBody();
  } catch (err) {
    conversation.pop();
    showError($("chat-error"), err.message);
    return;
  }
  input.value = "";
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const content = reply.querySelector(".content");
  const calls = [];
  let answer = "";
  let finish = null;
  let usage = null;
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          answer += delta.content;
          content.textContent = answer;
        }
        for (const part of delta.tool_calls || []) {
          const call = calls[part.index] || (calls[part.index] = { id: "", name: "", arguments: "" });
          if (part.id) call.id = part.id;
          if (part.function && part.function.name) call.name += part.function.name;
          if (part.function && part.function.arguments) call.arguments += part.function.arguments;
          renderToolCalls(reply, calls);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const message = { role: "assistant", content: answer || null };
    if (calls.length) {
      message.tool_calls = calls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }));
    }
    conversation.push(message);
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else {
      conversation.pop();  // the user's turn got no reply: leave it out of the next request
      reply.classList.add("failed");
      showError($("chat-error"), err.message);
    }
  } finally {
    controller = null;
    reply.classList.remove("streaming");
    reply.dataset.finish = finish || "";
    const meta = [finish ? "finish: " + finish : null, usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null];
    reply.append(el("div", { class: "meta", text: meta.filter(Boolean).join(" · ") }));
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

function chatKeydown(event) {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
}

// -- ask your documents ------------------------------------------------------------------------

function renderAnswer(result) {
  const answer = $("rag-answer");
  const sources = $("rag-sources");
  answer.replaceChildren();
  sources.replaceChildren();
  if (!result.covered) {
    answer.append(el("p", { class: "not-covered", text: result.answer }));
  } else {
    const paragraph = el("p");
    for (const sentence of result.sentences) {
      const span = el("span", { class: sentence.supported ? "sentence" : "sentence unsupported", text: sentence.text });
      if (!sentence.supported) span.title = "not supported by its citations";
      paragraph.append(span);
      for (const n of sentence.citations) {
        const link = el("a", { class: "citation", href: "#source-" + n, text: `[${n}]` });
        link.addEventListener("click", (e) => {
          e.preventDefault();  // scroll and highlight without changing the page's URL
          const target = $("source-" + n);
          if (!target) return;
          target.scrollIntoView({ block: "nearest" });
          target.classList.remove("flash");
          void target.offsetWidth;
          target.classList.add("flash");
        });
        paragraph.append(" ", link);
      }
      paragraph.append(" ");
    }
    answer.append(paragraph);
  }
  answer.append(el("div", { class: "meta", text: `retrieval confidence ${result.confidence.toFixed(3)} · ${result.mode}` }));
  for (const source of result.sources) {
    const where = `${source.source}:${source.start}-${source.end}`;
    const heading = [...source.heading_path, source.title].filter((t, i, all) => t && all.indexOf(t) === i).join(" › ");
    const score = source.score === null ? "" : `score ${source.score.toFixed(3)} · `;
    sources.append(el("li", { id: "source-" + source.number, class: "source", value: String(source.number) },
      el("div", { class: "source-title", text: heading ? `${heading} — ${where}` : where }),
      el("div", { class: "meta", text: `${score}support ${source.support.toFixed(2)}` }),
      el("blockquote", { text: source.text })));
  }
}

async function askDocuments(event) {
  event.preventDefault();
  const question = $("rag-question").value.trim();
  if (!question) return;
  showError($("rag-error"), "");
  $("rag-ask").disabled = true;
  $("rag-answer").replaceChildren(el("p", { class: "meta", text: "searching…" }));
  $("rag-sources").replaceChildren();
  try {
    const body = { question };
    const k = numberOf("rag-k");
    if (k !== null) body.k = k;
    renderAnswer(await api("/v1/rag/answer", body));
  } catch (err) {
    $("rag-answer").replaceChildren();
    showError($("rag-error"), err.message);
  } finally {
    $("rag-ask").disabled = false;
  }
}

// -- tokens --------------------------------------------------------------------------------------

// On a log scale, as most tokens' probabilities are small: p = 1 green, p = e^-4 (about 0.02)
// yellow, p <= e^-8 (about 0.0003) red. Tokens without a log-probability are grey.
const LOGPROB_FLOOR = -8;

function probabilityColour(logprob) {
  if (logprob === null || logprob === undefined) return "";
  const share = Math.min(1, Math.max(0, 1 - logprob / LOGPROB_FLOOR));
  return `hsl(${(120 * share).toFixed(1)}, 75%, 80%)`;
}

function visible(text) {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→") || "∅";
}

function tokenChip(text, id, logprob, alternatives) {
  const chip = el("span", { class: "token", text: visible(text) });
  const colour = probabilityColour(logprob);
  if (colour) chip.style.backgroundColor = colour;
  else chip.classList.add("unscored");
  if (logprob !== null && logprob !== undefined) chip.dataset.logprob = String(logprob);
  const lines = [];
  if (id !== null) lines.push("id " + id);
  lines.push(logprob === null || logprob === undefined ? "no log-probability (nothing precedes it)" : `logprob ${logprob.toFixed(3)} (p = ${Math.exp(logprob).toFixed(3)})`);
  if (alternatives) {
    for (const [alt, lp] of Object.entries(alternatives)) lines.push(`  ${JSON.stringify(alt)}: ${lp.toFixed(3)}`);
  }
  chip.title = lines.join("\n");
  if (id !== null) chip.append(el("sub", { text: String(id) }));
  return chip;
}

async function showTokens(event) {
  event.preventDefault();
  const prompt = $("tokens-prompt").value;
  if (!prompt) return;
  const model = $("model").value;
  showError($("tokens-error"), "");
  $("tokens-run").disabled = true;
  try {
    const tokens = await api("/v1/tokenize", { model, prompt });
    const maxTokens = numberOf("tokens-max") || 0;
    // echo + logprobs scores the prompt itself; max_tokens 0 scores it without generating.
    const completion = await api("/v1/completions", {
      model, prompt, echo: true, logprobs: 5, max_tokens: maxTokens, temperature: numberOf("tokens-temperature") ?? 0,
    });
    const lp = completion.choices[0].logprobs;
    const promptCount = tokens.count;
    $("tokens-summary").textContent = `${promptCount} tokens of ${tokens.max_model_len} in the context`;
    const promptBox = $("prompt-tokens");
    const completionBox = $("completion-tokens");
    promptBox.replaceChildren();
    completionBox.replaceChildren();
    for (let i = 0; i < lp.tokens.length; i++) {
      const inPrompt = i < promptCount;
      const id = inPrompt ? tokens.tokens[i] : null;
      const text = inPrompt ? tokens.token_strs[i] : lp.tokens[i];
      (inPrompt ? promptBox : completionBox).append(tokenChip(text, id, lp.token_logprobs[i], lp.top_logprobs[i]));
    }
    if (!completionBox.childElementCount) completionBox.append(el("span", { class: "meta", text: "no completion tokens asked for" }));
  } catch (err) {
    showError($("tokens-error"), err.message);
  } finally {
    $("tokens-run").disabled = false;
  }
}

// -- concepts ------------------------------------------------------------------------------------

let concepts = null;

function renderConcepts() {
  const query = $("concepts-search").value.trim().toLowerCase();
  const box = $("concepts");
  box.replaceChildren();
  const groups = new Map();
  for (const concept of concepts || []) {
    const haystack = ["name", "group", "summary", "module", "function"].map((f) => concept[f] || "").join(" ").toLowerCase();
    if (query && !haystack.includes(query)) continue;
    const group = concept.group || "other";
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(concept);
  }
  let shown = 0;
  for (const [group, members] of groups) {
    const body = el("tbody");
    for (const c of members) {
      shown += 1;
      const code = [c.module, c.function].filter(Boolean).join(".");
      body.append(el("tr", { class: "concept" },
        el("td", { class: "concept-name", text: c.name || "" }),
        el("td", { text: c.summary || "" }),
        el("td", {}, el("code", { text: code })),
        el("td", {}, el("code", { text: c.test || "" }), c.reference ? el("div", { class: "meta", text: "against " + c.reference }) : ""),
        el("td", { text: c.doc || "" }),
        el("td", {}, el("code", { text: c.demo || "" }))));
    }
    const head = el("tr", {}, ...["Concept", "What it is", "Implemented in", "Verified by", "Docs", "Demo"].map((h) => el("th", { text: h })));
    box.append(el("section", { class: "concept-group" }, el("h2", { text: group }),
      el("table", {}, el("thead", {}, head), body)));
  }
  $("concepts-count").textContent = `${shown} of ${(concepts || []).length} concepts`;
}

async function loadConcepts() {
  if (concepts !== null) return;
  showError($("concepts-error"), "");
  try {
    concepts = (await api("/v1/concepts")).data;
    renderConcepts();
  } catch (err) {
    showError($("concepts-error"), err.message);
  }
}
loaders.concepts = loadConcepts;

// -- start ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("#tabs button")) tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  $("key-set").addEventListener("click", setKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") setKey(); });
  $("key-forget").addEventListener("click", forgetKey);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", chatKeydown);
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", () => { conversation = []; $("transcript").replaceChildren(); showError($("chat-error"), ""); });
  $("rag-form").addEventListener("submit", askDocuments);
  $("tokens-form").addEventListener("submit", showTokens);
  $("concepts-search").addEventListener("input", renderConcepts);
  updateKeyStatus();
  loadModels();
  document.body.dataset.ready = "true";
});
