// The blip2 web page: talks to the server's public HTTP API only (/v1/...), with the key the user gives.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "blip2-api-key";

  const state = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    model: null, // the served model's id
    kind: null, // "generation" or "retrieval"
    image: null, // {url: data URL, name}
    history: [], // [{user, assistant}] of the conversation about the picture
    busy: false,
    index: null, // GET /v1/index, when the server has one
    thumbs: [], // blob URLs of the shown thumbnails
    heatFor: null, // the button whose map is over the picture
  };

  // ---- errors: one readable line --------------------------------------------------------------

  function showError(message) {
    const line = String(message || "something went wrong").split("\n")[0].trim().slice(0, 400);
    $("error").textContent = line;
    $("error").title = line;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // ---- the API, with the key ------------------------------------------------------------------

  let keyWaiters = null; // callers waiting for the user to type a key

  function askKey(refused) {
    if (!keyWaiters) {
      keyWaiters = [];
      $("key-note").textContent = refused
        ? "The server refused that key. Type it again; it is kept for this browser tab only."
        : "This server asks for a key. It is kept for this browser tab only.";
      $("api-key").value = "";
      $("key-dialog").showModal();
    }
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  function answerKeyWaiters(given) {
    const waiting = keyWaiters || [];
    keyWaiters = null;
    waiting.forEach((resolve) => resolve(given));
  }

  $("key-form").addEventListener("submit", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    answerKeyWaiters(true);
  });
  $("key-dialog").addEventListener("cancel", () => answerKeyWaiters(false));

  async function api(path, { method = "GET", body, raw = false } = {}) {
    for (let attempt = 0; ; attempt++) {
      const headers = {};
      if (state.key) headers.Authorization = `Bearer ${state.key}`;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      let resp;
      try {
        resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      } catch (e) {
        throw new ApiError(0, "cannot reach the server: is it still running?");
      }
      if (resp.status === 401 && attempt < 3) {
        if (!(await askKey(Boolean(state.key)))) throw new ApiError(401, "this server needs an API key");
        continue;
      }
      if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
      return raw ? resp : resp.json();
    }
  }

  async function errorMessage(resp) {
    try {
      const body = JSON.parse(await resp.text());
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) {
      // not JSON: say what the status says
    }
    if (resp.status === 503) return "the server is busy; try again in a moment";
    if (resp.status === 413) return "the picture is too large for this server";
    return `the server answered ${resp.status} ${resp.statusText}`.trim();
  }

  // Server-sent events of a streamed chat completion; onText gets the reply so far.
  async function streamChat(messages, extra, onText) {
    const body = { model: state.model, messages, stream: true, ...generationSettings(), ...extra };
    const resp = await api("/v1/chat/completions", { method: "POST", body, raw: true });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return text;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            text += delta.content;
            onText(text);
          }
        }
      }
    }
    return text;
  }

  function generationSettings() {
    const out = {};
    const max = parseInt($("max-tokens").value, 10);
    if (Number.isFinite(max) && max > 0) out.max_tokens = max;
    const mode = $("decoding").value;
    out.temperature = 0;
    if (mode === "sample") {
      const t = parseFloat($("temperature").value);
      out.temperature = Number.isFinite(t) && t > 0 ? Math.min(t, 2) : 0.7;
    } else if (mode === "beams") {
      const k = parseInt($("beams").value, 10);
      out.num_beams = Number.isFinite(k) ? Math.max(1, Math.min(k, 8)) : 3;
    }
    return out;
  }

  function showDecodingFields() {
    const mode = $("decoding").value;
    $("beams").disabled = mode !== "beams";
    $("temperature").disabled = mode !== "sample";
  }

  // ---- the picture ------------------------------------------------------------------------------

  function chooseFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => setImage(reader.result, file.name || "pasted picture");
    reader.onerror = () => showError(`${file.name}: the file cannot be read`);
    reader.readAsDataURL(file);
  }

  function setImage(url, name) {
    resetTalk();
    hideHeat();
    const img = $("preview-img");
    img.onload = () => {
      clearError();
      state.image = { url, name };
      $("preview").hidden = false;
      $("heat-controls").hidden = false;
      $("preview-name").textContent = `${name} · ${img.naturalWidth}×${img.naturalHeight}`;
      updateButtons();
    };
    img.onerror = () => {
      state.image = null;
      $("preview").hidden = true;
      $("heat-controls").hidden = true;
      updateButtons();
      showError(`${name}: not an image file (it cannot be decoded)`);
    };
    img.src = url;
  }

  function needImage() {
    if (state.image) return true;
    showError("choose a picture first");
    return false;
  }

  function imagePart() {
    return { type: "image_url", image_url: { url: state.image.url } };
  }

  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      $("file").click();
    }
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
  document.addEventListener("paste", (e) => {
    const items = Array.from((e.clipboardData && e.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) {
      e.preventDefault();
      chooseFile(item.getAsFile());
    }
  });

  // ---- where it looked --------------------------------------------------------------------------

  function lookButton(about, onMap) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "look";
    button.textContent = "Where it looked";
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", async () => {
      if (button.getAttribute("aria-pressed") === "true") {
        onMap(null, button);
        return;
      }
      button.disabled = true;
      try {
        const body = { model: state.model, method: $("heat-method").value, ...about.request() };
        onMap(await api("/v1/attention", { method: "POST", body }), button);
      } catch (e) {
        showError(e.message);
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  // A look button for a caption or answer about the chosen picture: its map goes over the preview.
  function pictureLook(text, where) {
    const about = {
      request: () => ({ image_url: { url: state.image.url }, text, ...where }),
    };
    return lookButton(about, (map, button) => {
      if (!map) return hideHeat();
      showHeat(map, button, text);
    });
  }

  function showHeat(map, button, text) {
    if (state.heatFor) state.heatFor.setAttribute("aria-pressed", "false");
    state.heatFor = button;
    if (button) button.setAttribute("aria-pressed", "true");
    $("heat").src = map.heatmap;
    $("heat").hidden = false;
    $("heat-toggle").checked = true;
    $("heat-about").textContent =
      map.method === "gradcam"
        ? `Grad-CAM for “${text}”`
        : "Q-Former cross-attention: what its queries read of the picture (they do not see the text)";
  }

  function hideHeat() {
    if (state.heatFor) state.heatFor.setAttribute("aria-pressed", "false");
    state.heatFor = null;
    $("heat").hidden = true;
    $("heat").removeAttribute("src");
    $("heat-toggle").checked = false;
    $("heat-about").textContent = "";
  }

  $("heat-toggle").addEventListener("change", async (e) => {
    if (!e.target.checked) {
      hideHeat();
      return;
    }
    if (!needImage()) {
      e.target.checked = false;
      return;
    }
    try {
      const body = { model: state.model, image_url: { url: state.image.url }, method: "attention" };
      showHeat(await api("/v1/attention", { method: "POST", body }), null, "");
    } catch (err) {
      e.target.checked = false;
      showError(err.message);
    }
  });

  // ---- caption and chat -------------------------------------------------------------------------

  function setBusy(busy) {
    state.busy = busy;
    $("talk").setAttribute("aria-busy", String(busy));
    updateButtons();
  }

  function updateButtons() {
    $("caption").disabled = state.busy || !state.image;
    $("send").disabled = state.busy;
    $("similar").disabled = !state.image;
  }

  async function caption() {
    if (state.busy || !needImage()) return;
    clearError();
    setBusy(true);
    const line = $("caption-line");
    const out = $("caption-text");
    line.querySelectorAll(".look").forEach((b) => b.remove());
    out.textContent = "…";
    try {
      const messages = [{ role: "user", content: [imagePart(), { type: "text", text: "" }] }];
      const text = (await streamChat(messages, { raw_prompt: true }, (t) => (out.textContent = t))).trim();
      out.textContent = text;
      line.append(pictureLook(text, { prompt: "" }));
    } catch (e) {
      out.textContent = "";
      showError(e.message);
    } finally {
      setBusy(false);
    }
  }

  function addTurn(role, text) {
    const li = document.createElement("li");
    li.className = role;
    const span = document.createElement("span");
    span.className = "text";
    span.textContent = text;
    li.append(span);
    $("conversation").append(li);
    return li;
  }

  async function send(question) {
    question = question.trim();
    if (!question || state.busy || !needImage()) return;
    clearError();
    setBusy(true);
    const messages = [];
    state.history.forEach((turn, i) => {
      messages.push({ role: "user", content: i === 0 ? [imagePart(), { type: "text", text: turn.user }] : turn.user });
      messages.push({ role: "assistant", content: turn.assistant });
    });
    const first = state.history.length === 0;
    messages.push({ role: "user", content: first ? [imagePart(), { type: "text", text: question }] : question });
    const asked = addTurn("user", question);
    const reply = addTurn("assistant", "…");
    const replyText = reply.querySelector(".text");
    $("message").value = "";
    try {
      const answer = (await streamChat(messages, {}, (t) => (replyText.textContent = t))).trim();
      replyText.textContent = answer;
      state.history.push({ user: question, assistant: answer });
      reply.append(pictureLook(answer, { question }));
    } catch (e) {
      asked.remove();
      reply.remove();
      $("message").value = question;
      showError(e.message);
    } finally {
      setBusy(false);
    }
  }

  function resetTalk() {
    state.history = [];
    $("conversation").textContent = "";
    $("caption-text").textContent = "";
    $("caption-line").querySelectorAll(".look").forEach((b) => b.remove());
    hideHeat();
    clearError();
  }

  $("caption").addEventListener("click", caption);
  $("reset").addEventListener("click", resetTalk);
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    send($("message").value);
  });
  $("decoding").addEventListener("change", showDecodingFields);

  // ---- search -------------------------------------------------------------------------------------

  function setupSearch(index) {
    state.index = index;
    $("search").hidden = false;
    const text = index.text_search;
    $("query").disabled = !text;
    $("rerank").disabled = !text;
    $("query").placeholder = text
      ? "Describe a picture, then press Enter"
      : "this index is searched by image: use “Like my picture” or click a result";
    $("search-about").textContent = `${index.images} images indexed.`;
  }

  async function search(query, label) {
    clearError();
    const body = { model: state.model, top: 12, ...query };
    if (query.text && $("rerank").checked) body.rerank = true;
    $("search").setAttribute("aria-busy", "true");
    try {
      const result = await api("/v1/search", { method: "POST", body });
      await showHits(result.data, query);
      $("search-about").textContent = `${result.data.length} best of ${state.index.images} images for ${label}.`;
    } catch (e) {
      showError(e.message);
    } finally {
      $("search").setAttribute("aria-busy", "false");
    }
  }

  async function thumbnail(path) {
    const resp = await api(`/v1/index/image?path=${encodeURIComponent(path)}&size=256`, { raw: true });
    const url = URL.createObjectURL(await resp.blob());
    state.thumbs.push(url);
    return url;
  }

  async function showHits(hits, query) {
    state.thumbs.forEach((url) => URL.revokeObjectURL(url));
    state.thumbs = [];
    const list = $("hits");
    list.textContent = "";
    for (const hit of hits) {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "hit";
      open.title = "find images like this one";
      open.setAttribute("aria-label", `images like ${hit.path}`);
      const frame = document.createElement("div");
      frame.className = "frame";
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = hit.path;
      const heat = document.createElement("img");
      heat.className = "heat";
      heat.alt = "";
      heat.hidden = true;
      frame.append(img, heat);
      open.append(frame);
      open.addEventListener("click", () => search({ index_path: hit.path }, `images like ${hit.path}`));
      const score = document.createElement("div");
      score.className = "score";
      const itc = document.createElement("span");
      itc.textContent = `score ${hit.score.toFixed(3)}`;
      score.append(itc);
      if (hit.itm !== null && hit.itm !== undefined) {
        const itm = document.createElement("span");
        itm.textContent = `ITM ${hit.itm.toFixed(3)}`;
        score.append(itm);
      }
      const path = document.createElement("span");
      path.className = "path";
      path.textContent = hit.path;
      li.append(open, score, path);
      if (query.text) {
        const about = { request: () => ({ index_path: hit.path, text: query.text }) };
        li.append(
          lookButton(about, (map, button) => {
            heat.hidden = !map;
            if (map) heat.src = map.heatmap;
            button.setAttribute("aria-pressed", String(Boolean(map)));
          }),
        );
      }
      list.append(li);
      thumbnail(hit.path).then(
        (url) => (img.src = url),
        (e) => (img.alt = `${hit.path} (${e.message})`),
      );
    }
  }

  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("query").value.trim();
    if (text) search({ text }, `“${text}”`);
  });
  $("similar").addEventListener("click", () => {
    if (needImage()) search({ image_url: { url: state.image.url } }, "your picture");
  });

  // ---- start ------------------------------------------------------------------------------------

  async function start() {
    showDecodingFields();
    updateButtons();
    try {
      const models = await api("/v1/models");
      const model = models.data[0];
      state.model = model.id;
      state.kind = model.kind;
      $("talk").hidden = model.kind !== "generation";
      let line = `${model.id} · ${model.kind} model`;
      try {
        setupSearch(await api("/v1/index"));
      } catch (e) {
        if (e.status !== 404) throw e;
        if (model.kind === "retrieval") line += " · start the server with --index IDX to search a collection";
      }
      $("model-line").textContent = line;
    } catch (e) {
      $("model-line").textContent = "not connected";
      showError(e.message);
    }
  }

  start();
})();
