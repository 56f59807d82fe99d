// Voice chat with Qwen2-Audio through the server's own /v1/chat/completions (streaming).
// State: the finished turns (audio as base64 + text) and the clips attached to the next turn.
"use strict";

const $ = (id) => document.getElementById(id);
const AUDIO_EXTENSIONS = ["wav", "mp3", "m4a", "aac", "ogg", "opus", "oga", "webm", "flac", "mp4"];
const turns = [];        // {role, text, audios: [{base64, format, url}]}
let attachments = [];    // {blob, name, format, url}
let controller = null;   // AbortController of the reply being streamed
let recorder = null;
let starting = false;       // getUserMedia is pending
let stopRequested = false;  // released before the microphone was ready
let modelName = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function formatOf(mime, name) {
  const fromName = (name.split(".").pop() || "").toLowerCase();
  if (AUDIO_EXTENSIONS.includes(fromName)) return fromName;
  const sub = (mime.split("/")[1] || "").split(";")[0];
  return { mpeg: "mp3", "x-wav": "wav", wave: "wav", "x-m4a": "m4a", mp4: "m4a" }[sub] || sub || "wav";
}

function isAudio(file) {
  const extension = (file.name.split(".").pop() || "").toLowerCase();
  return file.type.startsWith("audio/") || AUDIO_EXTENSIONS.includes(extension);
}

function attach(blob, name) {
  const item = { blob, name, format: formatOf(blob.type || "", name), url: URL.createObjectURL(blob) };
  attachments.push(item);
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  attachments.forEach((item, index) => {
    const li = document.createElement("li");
    const player = document.createElement("audio");
    player.controls = true;
    player.src = item.url;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.onclick = () => { attachments.splice(index, 1); renderAttachments(); };
    li.append(player, document.createTextNode(item.name), remove);
    list.append(li);
  });
}

function addFiles(files) {
  showError("");
  for (const file of files) {
    if (!isAudio(file)) {
      showError(`${file.name} is not an audio file (use wav, mp3, m4a, ogg, opus, webm or flac).`);
      continue;
    }
    attach(file, file.name);
  }
}

async function startRecording() {
  showError("");
  let stream;
  starting = true;
  stopRequested = false;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    starting = false;
    const refused = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
    showError(refused ? "Microphone access was refused. Allow it in the browser, or upload a file instead."
                      : `The microphone cannot be used (${error && error.name}). Upload a file instead.`);
    return;
  }
  const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
  const mimeType = types.find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t));
  recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
  const chunks = [];
  recorder.ondataavailable = (event) => { if (event.data.size) chunks.push(event.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((track) => track.stop());
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    const extension = blob.type.includes("ogg") ? "ogg" : blob.type.includes("mp4") ? "m4a" : "webm";
    attach(blob, `recording-${attachments.length + 1}.${extension}`);
    recorder = null;
    $("record").setAttribute("aria-pressed", "false");
    $("record").textContent = "● Record";
  };
  recorder.start(250);
  starting = false;
  $("record").setAttribute("aria-pressed", "true");
  $("record").textContent = "■ Stop recording";
  if (stopRequested) stopRecording();
}

function stopRecording() {
  if (starting) stopRequested = true;
  else if (recorder && recorder.state !== "inactive") recorder.stop();
}

function toBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function bubble(role, text, audios) {
  const li = document.createElement("li");
  li.className = role;
  for (const audio of audios || []) {
    const player = document.createElement("audio");
    player.controls = true;
    player.src = audio.url;
    li.append(player);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  $("history").append(li);
  li.scrollIntoView({ block: "end" });
  return body;
}

function apiMessages() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of turns) {
    if (turn.role === "assistant") {
      messages.push({ role: "assistant", content: turn.text });
      continue;
    }
    const content = turn.audios.map((a) => ({ type: "input_audio", input_audio: { data: a.base64, format: a.format } }));
    if (turn.text) content.push({ type: "text", text: turn.text });
    messages.push({ role: "user", content });
  }
  return messages;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("qwen2audio-api-key");
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("settings").open = true;
    showError("This server needs an API key: enter it in Settings.");
    return null;
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return (await response.json()).data[0].id;
}

async function send(event) {
  event.preventDefault();
  if (controller) return;
  const text = $("text").value.trim();
  if (!text && !attachments.length) {
    showError("Record or attach audio, or type an instruction.");
    return;
  }
  showError("");
  if (!modelName) modelName = await loadModel().catch((error) => { showError(String(error.message || error)); });
  if (!modelName) return;
  const audios = [];
  for (const item of attachments) audios.push({ base64: await toBase64(item.blob), format: item.format, url: item.url });
  const turn = { role: "user", text, audios };
  turns.push(turn);
  bubble("user", text, audios);
  attachments = [];
  renderAttachments();
  $("text").value = "";
  const body = { model: modelName, messages: apiMessages(), stream: true };
  const temperature = $("temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  await stream(body);
}

async function stream(body) {
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  const output = bubble("assistant", "", []);
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) $("settings").open = true;
      throw new Error(await errorMessage(response));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const payload = JSON.parse(line.slice(6));
        if (payload.error) throw new Error(payload.error.message);
        const delta = payload.choices.length ? payload.choices[0].delta.content : null;
        if (delta) {
          reply += delta;
          output.textContent = reply;
        }
      }
    }
    output.parentElement.dataset.done = "true";
  } catch (error) {
    if (error.name === "AbortError") {
      output.parentElement.dataset.done = "stopped";
      output.textContent = reply + " [stopped]";
    } else {
      output.parentElement.dataset.done = "error";
      turns.pop();  // the failed turn is not part of the conversation
      output.parentElement.previousElementSibling?.remove();
      output.parentElement.remove();
      showError(`The server could not answer: ${error.message || error}`);
      reply = null;
    }
  } finally {
    if (reply !== null) turns.push({ role: "assistant", text: reply, audios: [] });
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
}

function setup() {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    turns.length = 0;
    attachments = [];
    renderAttachments();
    $("history").replaceChildren();
    showError("");
  });
  $("file").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  // A click toggles recording; holding the button longer than 300 ms records until it is released.
  const record = $("record");
  let pressStart = 0;
  let pressStartedRecording = false;
  record.addEventListener("pointerdown", () => {
    pressStart = Date.now();
    pressStartedRecording = !recorder && !starting;
    if (pressStartedRecording) startRecording();
  });
  record.addEventListener("pointerup", () => {
    const held = Date.now() - pressStart > 300;
    if (held === pressStartedRecording) stopRecording();
  });
  record.addEventListener("click", (event) => {
    if (event.detail === 0) {  // keyboard (Enter or Space)
      if (recorder || starting) stopRecording(); else startRecording();
    }
  });
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("composer").requestSubmit();
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape" && controller) controller.abort(); });
  $("api-key").addEventListener("change", () => localStorage.setItem("qwen2audio-api-key", $("api-key").value.trim()));
}

setup();
