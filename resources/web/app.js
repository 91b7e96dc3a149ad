// LM Gate's phone page: pair with the one-time code from the QR code, then chat.
// No framework, no build step, no third-party requests; model output is rendered as Markdown
// by markdown.js (sanitized, raw HTML shown as text).
"use strict";

const TOKEN_KEY = "lmgate.token";
const CONVERSATION_KEY = "lmgate.conversation";  // the one to resume after a reload
// A system prompt set with Done but not yet sent, per conversation ("new" for a new chat): the
// server takes it only with the next message, and a reload must not lose it meanwhile.
const PENDING_SYSTEM_KEY = "lmgate.system.";
// What a pairing code looks like (tray_app/identity/pairing.py): anything else is not posted.
const CODE_SHAPE = /^[A-Z2-7]{24}$/;
const $ = (id) => document.getElementById(id);
const state = { token: localStorage.getItem(TOKEN_KEY), conversationId: null, controller: null,
                lastMessage: null, lastImage: null, editing: null,
                system: "",  // this conversation's system prompt
                systemChanged: false,  // changed here since the server last took it
                photo: null, photoSource: null,  // the attached photo (data URL) and its bitmap
                // The gateway's, from /api/conversations; these defaults until it answers.
                limits: { max_body_bytes: 32 * 1024 * 1024, max_image_bytes: 2 * 1024 * 1024 } };

class Offline extends Error {}
class ApiProblem extends Error {
  constructor(status, error, conversationId) {
    // LM Studio's own errors are sometimes a bare string ({"error": "Model does not ..."}).
    super((typeof error === "string" && error) || (error && error.message) ||
          `LM Gate answered ${status}`);
    this.status = status;
    this.code = error && error.code;
    this.conversationId = conversationId || null;  // where a failed turn was kept
    this.sentModel = null;  // the model a failed message named, if any
  }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { "ngrok-skip-browser-warning": "1" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, signal, cache: "no-store",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Offline("Can't reach LM Gate. Check this phone's connection, and that the " +
                      "computer is on and LM Gate is running there and open to phones.");
  }
  if (!response.ok) {
    let payload = null;
    try { payload = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiProblem(response.status, payload && payload.error,
                         response.headers.get("X-Conversation-ID"));
  }
  return response;
}

function show(screen) {
  $("pair-screen").hidden = screen !== "pair";
  $("chat-screen").hidden = screen !== "chat";
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function deviceName() {
  const ua = navigator.userAgent;
  for (const [pattern, name] of [[/iPhone/, "iPhone"], [/iPad/, "iPad"], [/Android/, "Android phone"],
                                 [/Macintosh/, "Mac"], [/Windows/, "Windows PC"], [/Linux/, "Linux"]]) {
    if (pattern.test(ua)) return `${name} (browser)`;
  }
  return "Browser";
}

function forget(message) {
  state.token = null;
  localStorage.removeItem(TOKEN_KEY);
  current(null);
  $("pair-status").textContent = message;
  show("pair");
}

// ---- pairing -------------------------------------------------------------------------------

// Any link can carry a fragment: a failed pairing never costs a paired phone its pairing.
function pairingFailed(message) {
  if (state.token) notice(message);
  else forget(message);
}

async function pairFromFragment() {
  const fragment = location.hash.slice(1);
  if (!fragment) return;
  // The code was only in the fragment, which no server saw; it must not stay in the bar or history.
  history.replaceState(null, "", location.pathname + location.search);
  let code = "";
  try {
    code = decodeURIComponent(fragment).trim();
  } catch (_) { /* not even percent-encoding: not a code either */ }
  if (!CODE_SHAPE.test(code)) {
    pairingFailed("This link holds no pairing code. Scan the QR code LM Gate shows.");
    return;
  }
  if (!state.token) $("pair-status").textContent = "Pairing…";
  try {
    const response = await api("/pair", { method: "POST",
                                          body: { code, device_name: deviceName() } });
    const paired = await response.json();
    state.token = paired.token;
    localStorage.setItem(TOKEN_KEY, paired.token);
    $("pair-status").textContent = "";
  } catch (error) {
    const messages = {
      pairing_code_expired: "This QR code has expired. Ask for a new QR code.",
      pairing_code_used: "This QR code was already used. Ask for a new QR code.",
      pairing_code_invalid: "This QR code is not valid. Ask for a new QR code.",
      too_many_pairing_attempts: "Too many tries. Wait a minute, then scan a new QR code.",
    };
    pairingFailed((error instanceof ApiProblem && messages[error.code]) || error.message);
  }
}

// ---- models and conversations ------------------------------------------------------------

function current(id) {
  state.conversationId = id;
  if (id) localStorage.setItem(CONVERSATION_KEY, id);
  else localStorage.removeItem(CONVERSATION_KEY);
}

function button(text, className) {
  const made = document.createElement("button");
  made.type = "button";
  made.className = className;
  made.textContent = text;
  return made;
}

// "14:05", "Yesterday 09:12", "3 Dec", "3 Dec 2025": when a conversation was last used.
function when(seconds) {
  const date = new Date(seconds * 1000);
  const now = new Date();
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === now.toDateString()) return time;
  const yesterday = new Date(now);
  yesterday.setDate(now.getDate() - 1);
  if (date.toDateString() === yesterday.toDateString()) return `Yesterday ${time}`;
  const parts = { day: "numeric", month: "short" };
  if (date.getFullYear() !== now.getFullYear()) parts.year = "numeric";
  return date.toLocaleDateString([], parts);
}

async function loadModels() {
  const response = await api("/v1/models");
  const payload = await response.json();
  const select = $("model");
  const previous = select.value || localStorage.getItem("lmgate.model");
  select.replaceChildren(...payload.data.map((model) => new Option(model.id, model.id)));
  if (previous && payload.data.some((m) => m.id === previous)) select.value = previous;
  if (!payload.data.length) notice(NO_MODEL);
}

async function loadConversations() {
  const response = await api("/api/conversations");
  const payload = await response.json();
  if (payload.limits) state.limits = payload.limits;
  const list = $("conversation-list");
  list.replaceChildren(...payload.data.map((conversation) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open" + (conversation.id === state.conversationId ? " current" : "");
    open.textContent = conversation.title;
    open.addEventListener("click", () => openConversation(conversation.id));
    const date = document.createElement("time");
    date.dateTime = new Date(conversation.updated * 1000).toISOString();
    date.textContent = when(conversation.updated);
    const remove = button("×", "delete");
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    remove.addEventListener("click", () => confirmDelete(item, conversation));
    item.append(open, date, remove);
    return item;
  }));
  if (!payload.data.length) {
    const empty = document.createElement("li");
    empty.textContent = "No conversations yet.";
    list.append(empty);
  }
}

async function openConversation(id) {
  const response = await api(`/api/conversations/${encodeURIComponent(id)}`);
  const conversation = await response.json();
  current(conversation.id);
  stopEdit();
  setSystem(conversation.system || "");
  restorePendingSystem();
  $("messages").replaceChildren();
  for (const message of conversation.messages) {
    const bubble = addBubble(message.role);
    if (message.role === "assistant") renderAnswer(bubble, message.content, message.reasoning);
    else fillQuestion(bubble, message.content, message.image);
    addTools(bubble, message.content);
  }
  const last = conversation.messages[conversation.messages.length - 1];
  if (!last || last.role !== "assistant") dropRegenerate();
  if (conversation.model) $("model").value = conversation.model;
  toggleConversations(false);
  await loadConversations();
}

// Asked inline (no window.confirm, which some phone browsers suppress): the row becomes the
// question until it is answered.
function confirmDelete(item, conversation) {
  const shown = [...item.childNodes];
  const question = document.createElement("span");
  question.className = "question";
  question.textContent = `Delete “${conversation.title}”?`;
  const yes = button("Delete", "confirm-delete");
  const no = button("Cancel", "cancel-delete");
  yes.addEventListener("click", () => deleteConversation(conversation.id).catch(showProblem));
  no.addEventListener("click", () => {
    item.classList.remove("confirming");
    item.replaceChildren(...shown);
  });
  item.classList.add("confirming");
  item.replaceChildren(question, yes, no);
  no.focus();
}

async function deleteConversation(id) {
  await api(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  localStorage.removeItem(PENDING_SYSTEM_KEY + id);
  if (id === state.conversationId) newChat();
  await loadConversations();
}

function newChat() {
  current(null);
  stopEdit();
  setSystem("");
  restorePendingSystem();
  dropPhoto();
  $("messages").replaceChildren();
  notice("");
  $("input").focus();
}

function toggleConversations(open) {
  const panel = $("conversations");
  panel.hidden = open === undefined ? !panel.hidden : !open;
  $("conversations-button").setAttribute("aria-expanded", String(!panel.hidden));
}

// ---- rendering ------------------------------------------------------------------------------

const said = new WeakMap();  // bubble -> its text as sent or received (an answer's Markdown)
const photoOf = new WeakMap();  // a question's bubble -> the photo sent with it

// A question: its photo (if any) above its text. textContent only: the text is never HTML.
function fillQuestion(bubble, text, image) {
  bubble.replaceChildren();
  if (image) {
    const img = document.createElement("img");
    img.className = "photo";
    img.alt = "Photo";
    // Decoded after the bubble was placed: the view that followed the thread still follows it
    // once the photo has its height.
    const follow = atBottom();
    img.addEventListener("load", () => { if (follow) toBottom(); }, { once: true });
    img.src = image;  // a data: URL checked by the gateway; the CSP allows no other source
    bubble.append(img);
    photoOf.set(bubble, image);
  }
  const words = document.createElement("span");
  words.textContent = text;
  bubble.append(words);
}

// Copy under every message; Edit under the last question, Regenerate under the last answer.
function addTools(bubble, text) {
  said.set(bubble, text);
  const answer = bubble.classList.contains("assistant");
  const tools = document.createElement("div");
  tools.className = `tools ${answer ? "assistant" : "user"}`;
  const copy = button("Copy", "copy-message");
  copy.setAttribute("aria-label", answer ? "Copy answer" : "Copy message");
  // An answer copies what the reader sees, not its Markdown: that may hold text never shown
  // (a reference-style comment, say) which a paste into a terminal would run.
  copy.addEventListener("click", () => {
    const shown = answer && bubble.querySelector(":scope > .answer");
    LMGateMarkdown.copyText(shown ? shown.innerText.trim() : said.get(bubble), copy);
  });
  tools.append(copy);
  if (answer) {
    dropRegenerate();
    const again = button("Regenerate", "regenerate");
    again.addEventListener("click", () => regenerate(bubble, tools));
    tools.append(again);
  } else {
    dropEdit();
    const edit = button("Edit", "edit");
    edit.addEventListener("click", () => startEdit(bubble));
    tools.append(edit);
  }
  bubble.after(tools);
}

function dropRegenerate() {
  for (const old of $("messages").querySelectorAll(".regenerate")) old.remove();
}

function dropEdit() {
  for (const old of $("messages").querySelectorAll(".edit")) old.remove();
}

// The question goes back into the composer; sending it replaces the last question and its
// answer, on the server too (edit: true).
function startEdit(bubble) {
  if (state.controller) return;
  state.editing = bubble;
  $("input").value = said.get(bubble);
  $("cancel-edit").hidden = false;
  $("input").focus();
}

function stopEdit() {
  state.editing = null;
  $("cancel-edit").hidden = true;
}

// The answer is replaced, on the server too (retry: the stored question is answered again).
function regenerate(bubble, tools) {
  if (state.controller) return;
  let question = bubble.previousElementSibling;
  while (question && !question.matches(".message.user")) question = question.previousElementSibling;
  if (!question) return;
  bubble.remove();
  tools.remove();
  send(said.get(question), { retry: true });
}

function addBubble(role) {
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  $("messages").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

// "waiting, 2 ahead" from the gateway's queue (or "loading the model" from its model guard),
// in the answer's place until its first word: said as a sentence, so a busy computer does not
// look like a stuck page.
const WAITING = /^(waiting|loading)\b/i;
// First in the queue: "0 ahead" reads like nothing is happening. The gateway may say it so
// itself one day ("waiting, next in line").
const NEXT_IN_LINE = /^waiting,\s*(0 ahead|next in line)$/i;

function waitingWords(comment) {
  if (NEXT_IN_LINE.test(comment)) return "Next in line";
  return comment.charAt(0).toUpperCase() + comment.slice(1);
}

function showWaiting(bubble, comment) {
  if (!WAITING.test(comment)) return;  // a keep-alive
  let line = bubble.querySelector(":scope > .waiting");
  if (!line) {
    line = document.createElement("p");
    line.className = "waiting";
    line.setAttribute("role", "status");
    bubble.replaceChildren(line);
  }
  const words = waitingWords(comment);
  if (line.textContent !== words) line.textContent = words;
}

// Updates the bubble in place: the Thinking section (and whether the reader opened it) and the
// blocks of the answer that did not change are kept, not rebuilt.
function renderAnswer(bubble, content, reasoning, { streaming = false } = {}) {
  let answer = bubble.querySelector(":scope > .answer");
  if (!answer) {
    answer = document.createElement("div");
    answer.className = "answer";
    bubble.replaceChildren(answer);
  }
  if (reasoning) {
    let details = bubble.querySelector(":scope > details.thinking");
    if (!details) {
      details = document.createElement("details");
      details.className = "thinking";
      const summary = document.createElement("summary");
      summary.textContent = "Thinking";
      const body = document.createElement("div");
      body.className = "thinking-text";
      details.append(summary, body);
      bubble.prepend(details);
    }
    const body = details.querySelector(".thinking-text");
    if (body.textContent !== reasoning) body.textContent = reasoning;
  }
  LMGateMarkdown.render(answer, content, { streaming });
}

// The view follows a growing answer only while the reader is at the bottom of the list.
function atBottom() {
  const list = $("messages");
  return list.scrollHeight - list.scrollTop - list.clientHeight < 24;
}

function toBottom() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

// The API's messages are written for whoever runs the computer (settings, LM Studio's Developer
// tab); the phone's user gets what it means for them and what they can do from here.
const PHONE_WORDING = {
  upstream_unreachable: "The computer's LM Studio is off. Start LM Studio (and its server) " +
                        "on the computer, then tap Retry.",
  upstream_failed: "The computer's LM Studio stopped answering. Check that it is running on " +
                   "the computer, then tap Retry.",
  upstream_stream_failed: "The connection to the computer's LM Studio broke off; the answer is " +
                          "incomplete. Tap Retry.",
  upstream_timeout: "The computer's LM Studio took too long to answer. Tap Retry, or try a " +
                    "shorter message.",
  upstream_auth_failed: "The computer's LM Studio is locked with a password (an API token) " +
                        "that LM Gate does not have. Ask the computer's owner to give LM Gate " +
                        "that token.",
  upstream_bad_response: "The computer's LM Studio sent an answer LM Gate could not read. " +
                         "Tap Retry.",
  upstream_response_too_large: "The answer is too long to keep. Ask for a shorter one.",
  upstream_event_too_large: "The answer was cut short: a piece of it was too big to pass on. " +
                            "Tap Retry.",
  shutting_down: "LM Gate on the computer is shutting down. Try again once it is back.",
  model_not_allowed: "This phone may not use this model. Choose another one above.",
  invalid_model: "That model is not available. Choose another one above.",
  rate_limit_exceeded: "Too many messages at once. Wait a moment, then tap Retry.",
  too_many_concurrent_requests: "Too many answers at once. Wait a moment, then tap Retry.",
  queue_full: "The computer is busy answering others, and too many are already waiting. " +
              "Wait a moment, then tap Retry.",
  queue_timeout: "The computer stayed busy answering others for too long. Tap Retry in a " +
                 "moment.",
  model_busy: "The computer is answering others with another model; this one can load once " +
              "they finish. Tap Retry in a moment.",
  model_load_failed: "The computer's LM Studio could not load this model. Choose another one " +
                     "above, or ask the computer's owner.",
  model_load_timeout: "The computer's LM Studio took too long to load this model. Tap Retry.",
  // budget_exceeded: the gateway's own words already say how much, until when, and whom to ask.
  body_too_large: "This message is too long to send. Shorten it.",
  conversation_not_found: "This conversation was deleted. Start a new chat.",
  image_too_large: "This photo is too large to send. Try a smaller one.",
  invalid_image: "This photo could not be sent. Try taking or choosing it again.",
  image_type_not_allowed: "Only JPEG, PNG and WebP photos can be sent. Choose another one.",
  too_many_images: "This conversation already holds as many photos as it can. Start a new " +
                   "chat to send another photo.",
};

// Said when LM Studio lists no model, and when the gateway found none to pick for a message
// the page sent without one (its model menu was empty).
const NO_MODEL = "No model is loaded in the computer's LM Studio. Ask its owner to load one.";
// missing_model is also the answer to a request that named no model: for a message that did
// name one, "none loaded" would be wrong.
const MODEL_NOT_NAMED = "The computer's LM Studio says no model was chosen. Choose a model " +
                        "above, then tap Retry.";

// LM Studio's refusal of a photo for a model without vision, in its various wordings.
const NO_VISION = /does not support image|not support (image|vision)|image input|vision/i;

// The gateway says when a budget resets in UTC ("resets at 2026-12-03 00:00 UTC", or ISO
// 8601): the phone's user reads it in their own time and how long that is from now.
const UTC_RESET = /resets at (\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d)(?::\d\d)?(?: UTC|Z)/;

function twoDigits(number) {
  return String(number).padStart(2, "0");
}

function fromNow(ms) {
  const minutes = Math.max(1, Math.round(ms / 60000));
  if (minutes < 60) return `in ${minutes} min`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `in ${hours} h`;
  return `in ${Math.round(hours / 24)} days`;
}

const DAY_MS = 24 * 3600 * 1000;

function localReset(message, now = new Date()) {
  const found = UTC_RESET.exec(message);
  if (!found) return message;
  const [, year, month, day, hour, minute] = found.map(Number);
  const resets = new Date(Date.UTC(year, month - 1, day, hour, minute));
  let when = `at ${twoDigits(resets.getHours())}:${twoDigits(resets.getMinutes())}`;
  if (resets - now >= DAY_MS) {  // a month's reset: "at 01:00" alone would read as today
    const date = resets.toLocaleDateString(undefined, { weekday: "short", month: "short",
                                                        day: "numeric" });
    when = `on ${date} ${when}`;
  }
  return message.replace(found[0], `resets ${when} (${fromNow(resets - now)})`);
}

function phoneWording(error) {
  if (!(error instanceof ApiProblem)) return error.message;
  if (error.code === "budget_exceeded") return localReset(error.message);
  if (error.code === "missing_model") return error.sentModel ? MODEL_NOT_NAMED : NO_MODEL;
  if (PHONE_WORDING[error.code]) return PHONE_WORDING[error.code];
  if ((error.code === "upstream_error" || !error.code) && NO_VISION.test(error.message)) {
    return "This model can't see photos. Choose a model that can (a vision model) above, " +
           "then tap Retry.";
  }
  // LM Studio's own refusal (e.g. a model that is not loaded) says what went wrong.
  if (error.code === "upstream_error" || !error.code) {
    return `The computer's LM Studio answered: ${error.message}`;
  }
  return error.message;
}

// What was said stays: a partial answer keeps its bubble, with the error under it.
function showFailure(bubble, content, reasoning, error) {
  if (content || reasoning) {
    renderAnswer(bubble, content, reasoning);
  } else {
    bubble.replaceChildren();
    bubble.className = "message error";  // nothing was said: the bubble is the error
  }
  bubble.classList.add("failed");
  const line = document.createElement("p");
  line.className = "error-line";
  line.setAttribute("role", "alert");
  line.textContent = phoneWording(error);
  bubble.append(line);
  $("retry").hidden = false;
  line.scrollIntoView({ block: "nearest" });
}

// ---- the system prompt -----------------------------------------------------------------------

// Kept with the conversation on the server: a change goes with the next message, and the server
// sends it first with that one and every one after.
function setSystem(text, { changed = false } = {}) {
  state.system = text;
  state.systemChanged = changed;
  if (changed) localStorage.setItem(pendingSystemKey(), text);
  $("system-input").value = text;
  const button = $("system-button");
  button.classList.toggle("set", Boolean(text));
  button.title = text ? "System prompt (set)" : "System prompt";
  button.setAttribute("aria-label", text ? "System prompt (set)" : "System prompt");
}

function pendingSystemKey(id = state.conversationId) {
  return PENDING_SYSTEM_KEY + (id || "new");
}

// A prompt set here before a reload (or before this conversation was left) and not yet sent.
function restorePendingSystem() {
  const pending = localStorage.getItem(pendingSystemKey());
  if (pending !== null && pending !== state.system) setSystem(pending, { changed: true });
}

function toggleSystem(open) {
  const panel = $("system-panel");
  panel.hidden = open === undefined ? !panel.hidden : !open;
  $("system-button").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) {
    $("system-input").value = state.system;
    $("system-input").focus();
  }
}

// ---- photos ---------------------------------------------------------------------------------

// Resized here, before upload: a phone's 12-megapixel photo is 3-6 MB, a model sees ~1 MP.
const PHOTO_SIDE = 1280;
const PHOTO_QUALITY = 0.85;
const JPEG_PREFIX = "data:image/jpeg;base64,".length;

async function attachPhoto(file) {
  if (!file) return;
  let bitmap;
  try {
    // Not through an <img>: the page's CSP allows no blob: images, and a bitmap needs none.
    bitmap = await createImageBitmap(file);
  } catch (_) {
    notice("This file could not be read as a photo. Choose a JPEG, PNG or WebP photo.");
    return;
  }
  state.photoSource = bitmap;
  state.photo = encodePhoto(bitmap, photoBudget($("input").value));
  if (!state.photo) {
    dropPhoto();
    notice("This photo is too large to send, even made smaller.");
    return;
  }
  notice("");
  $("photo-thumb").src = state.photo;
  $("photo-preview").hidden = false;
}

function dropPhoto() {
  state.photo = null;
  if (state.photoSource) state.photoSource.close();
  state.photoSource = null;
  $("photo-preview").hidden = true;
  $("photo-thumb").removeAttribute("src");
}

// The decoded bytes a photo may have: the gateway's photo limit, and what is left of its body
// limit after the rest of the request (base64 makes 3 bytes 4; 4 KB for the JSON around it).
function photoBudget(text) {
  const rest = new Blob([JSON.stringify({ message: text, system: state.system })]).size + 4096;
  return Math.min(state.limits.max_image_bytes,
                  Math.floor((state.limits.max_body_bytes - rest) * 3 / 4));
}

function photoBytes(url) {
  return Math.ceil((url.length - JPEG_PREFIX) * 3 / 4);
}

// A JPEG of at most PHOTO_SIDE px that fits the budget: first less quality, then fewer pixels.
function encodePhoto(bitmap, budget) {
  const canvas = document.createElement("canvas");
  let side = Math.min(PHOTO_SIDE, Math.max(bitmap.width, bitmap.height));
  let quality = PHOTO_QUALITY;
  while (side >= 64) {
    const scale = side / Math.max(bitmap.width, bitmap.height);
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";  // a transparent PNG would turn black in a JPEG
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const url = canvas.toDataURL("image/jpeg", quality);
    if (photoBytes(url) <= budget) return url;
    if (quality > 0.6) quality -= 0.1;
    else side = Math.floor(side * 0.75);
  }
  return null;
}

// The attached photo for a message: null for none, undefined if it cannot be made to fit.
function fitPhoto(text) {
  if (!state.photo) return null;
  const budget = photoBudget(text);
  if (photoBytes(state.photo) <= budget) return state.photo;
  const smaller = state.photoSource && encodePhoto(state.photoSource, budget);
  if (smaller) return smaller;
  notice("This photo and message are too large to send together. Shorten the message.");
  return undefined;
}

// ---- chatting -----------------------------------------------------------------------------

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("retry").hidden = true;
}

// retry: the server already holds this turn (a failed or broken one, or the answer being
// regenerated) and answers it again instead of storing the message twice.
// image: a photo sent with this turn; shownImage: one the server already holds for it (an edit
// keeps its question's photo), shown but not sent again.
async function send(text, { retry = false, edit = false, image = null, shownImage = null } = {}) {
  state.lastMessage = text;
  notice("");
  dropRegenerate();
  state.lastImage = image;
  if (!retry) {
    const mine = addBubble("user");
    fillQuestion(mine, text, image || shownImage);
    addTools(mine, text);
  }
  const bubble = addBubble("assistant");
  bubble.textContent = "…";
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  let content = "";
  let reasoning = "";
  // At most one render per frame, however fast the chunks come; and a render that takes long
  // (a huge or pathological answer) waits three times its own time before the next, so it
  // never takes more than a quarter of the phone's time while the answer streams.
  let frame = 0;
  let nextPaint = 0;
  const paint = (streaming = true) => {
    frame = 0;
    const follow = atBottom();
    const started = performance.now();
    renderAnswer(bubble, content, reasoning, { streaming });
    const took = performance.now() - started;
    nextPaint = performance.now() + 3 * took;
    if (follow) toBottom();
  };
  let later = 0;
  const schedule = () => {
    const wait = nextPaint - performance.now();
    if (wait <= 0) {
      frame = requestAnimationFrame(() => paint());
    } else {
      frame = -1;  // scheduled, not yet a frame
      later = setTimeout(() => { frame = requestAnimationFrame(() => paint()); }, wait);
    }
  };
  const unschedule = () => {
    clearTimeout(later);
    if (frame > 0) cancelAnimationFrame(frame);
    frame = 0;
  };
  const systemKey = pendingSystemKey();
  // With an empty model menu none is named: the gateway picks the conversation's, or says
  // there is none ("" would be refused as a bad model name).
  const model = $("model").value || undefined;
  try {
    const response = await api("/api/chat", {
      method: "POST", signal: controller.signal,
      body: { message: text, conversation_id: state.conversationId, model,
              stream: true, retry, edit,
              // Only a change is sent: another tab's newer prompt is not overwritten.
              ...(state.systemChanged ? { system: state.system } : {}),
              ...(image ? { image } : {}) },
    });
    current(response.headers.get("X-Conversation-ID") || state.conversationId);
    if (state.systemChanged) localStorage.removeItem(systemKey);
    state.systemChanged = false;  // the server keeps it now
    if (model) localStorage.setItem("lmgate.model", model);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        // SSE comments are keep-alives, or the gateway's queue telling this answer its place.
        if (line.startsWith(":")) {
          if (!content && !reasoning) showWaiting(bubble, line.slice(1).trim());
          continue;
        }
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        let event;
        try { event = JSON.parse(data); } catch (_) { continue; }
        if (event.error) throw new ApiProblem(502, event.error, state.conversationId);
        const delta = (event.choices && event.choices[0] && event.choices[0].delta) || {};
        if (typeof delta.content === "string") content += delta.content;
        const thinking = delta.reasoning || delta.reasoning_content;
        if (typeof thinking === "string") reasoning += thinking;
      }
      if ((content || reasoning) && !frame) schedule();
    }
    unschedule();
    paint(false);
    const follow = atBottom();
    addTools(bubble, content);
    if (follow) toBottom();  // the tools row is part of the answer's end
  } catch (error) {
    unschedule();
    if (error.name === "AbortError") {
      renderAnswer(bubble, content, reasoning);
      const stopped = document.createElement("p");
      stopped.className = "stopped";
      stopped.textContent = "Stopped.";
      bubble.append(stopped);
      addTools(bubble, content);
      stopped.scrollIntoView({ block: "nearest" });
    } else if (error instanceof ApiProblem && error.status === 401) {
      forget("This phone's access was revoked or has expired. Scan a new QR code to pair again.");
      return;
    } else {
      if (error instanceof ApiProblem) error.sentModel = model || null;
      if (error instanceof ApiProblem && error.conversationId) current(error.conversationId);
      showFailure(bubble, content, reasoning, error);
      dropEdit();  // a failed question is retried; an edit could replace the one before it
    }
  } finally {
    state.controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
  loadConversations().catch(() => {});
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    const image = fitPhoto(text);
    if (image === undefined) return;  // could not be made small enough: said in the notice
    $("input").value = "";
    const editing = state.editing;
    stopEdit();
    const shownImage = editing ? photoOf.get(editing) : null;
    if (editing) {
      while (editing.nextElementSibling) editing.nextElementSibling.remove();
      editing.remove();
    }
    dropPhoto();
    send(text, { edit: Boolean(editing), image, shownImage });
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && window.matchMedia("(pointer: fine)").matches) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("retry").addEventListener("click", () => {
    const last = $("messages").lastElementChild;
    if (last && last.classList.contains("failed")) last.remove();
    // The photo goes again: a turn that never reached LM Gate is stored only now.
    if (state.lastMessage) send(state.lastMessage, { retry: true, image: state.lastImage });
  });
  $("new-chat").addEventListener("click", newChat);
  $("cancel-edit").addEventListener("click", () => {
    stopEdit();
    $("input").value = "";
  });
  $("conversations-button").addEventListener("click", () => toggleConversations());
  $("attach").addEventListener("click", () => $("photo-input").click());
  $("photo-input").addEventListener("change", () => {
    const file = $("photo-input").files[0];
    $("photo-input").value = "";  // the same photo can be picked again after a remove
    attachPhoto(file).catch(showProblem);
  });
  $("photo-remove").addEventListener("click", dropPhoto);
  $("system-button").addEventListener("click", () => toggleSystem());
  $("system-done").addEventListener("click", () => {
    const text = $("system-input").value.trim();
    if (text !== state.system) setSystem(text, { changed: true });
    toggleSystem(false);
    $("input").focus();
  });
  $("system-clear").addEventListener("click", () => {
    $("system-input").value = "";
    if (state.system) setSystem("", { changed: true });
  });
  window.addEventListener("online", () => notice(""));
  window.addEventListener("offline", () => notice("This phone is offline."));
}

// Also when a new pairing link is opened in a tab that already shows the page: only the
// fragment changes, so the page is not loaded again.
async function enter() {
  await pairFromFragment();
  if (!state.token) {
    show("pair");
    return;
  }
  show("chat");
  try {
    await loadModels();
    if (localStorage.getItem(CONVERSATION_KEY)) await resume();
    else restorePendingSystem();
    await loadConversations();
  } catch (error) {
    showProblem(error);
  }
}

// After a reload the last conversation is on screen again, as it was.
async function resume() {
  const id = localStorage.getItem(CONVERSATION_KEY);
  if (!id || state.conversationId === id) return;
  try {
    await openConversation(id);
  } catch (error) {
    // LM Gate's answer or no connection: said as usual (a 401 unpairs), the id kept for later.
    if (error instanceof Offline || (error instanceof ApiProblem && error.status !== 404)) {
      throw error;
    }
    // Deleted meanwhile (perhaps from another tab), or it could not be shown here: start
    // afresh rather than fail the same way on every load.
    current(null);
    $("messages").replaceChildren();
    setSystem("");
    restorePendingSystem();
    if (!(error instanceof ApiProblem)) notice("The last conversation could not be shown.");
  }
}

function showProblem(error) {
  if (error instanceof ApiProblem && error.status === 401) {
    forget("This phone's access was revoked or has expired. Scan a new QR code to pair again.");
  } else {
    notice(phoneWording(error));
  }
}

function start() {
  wire();
  window.addEventListener("hashchange", () => {
    if (location.hash.length > 1) enter();
  });
  enter();
}

start();
