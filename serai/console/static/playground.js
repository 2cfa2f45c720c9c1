// The playground: the public API, called from the browser with the signed-in key.
(function () {
  "use strict";
  var KEY = "serai.console.key";
  var history = [];

  function $(id) { return document.getElementById(id); }

  function key() { return sessionStorage.getItem(KEY) || ""; }

  function headers() {
    return { "Authorization": "Bearer " + key(), "Content-Type": "application/json" };
  }

  function problem(body, status) {
    try { return JSON.parse(body).error.message; } catch (e) { return "The server answered " + status + "."; }
  }

  function loadModels() {
    var select = $("model");
    fetch("/v1/models", { headers: headers() }).then(function (response) {
      return response.text().then(function (text) {
        if (!response.ok) throw new Error(problem(text, response.status));
        var models = JSON.parse(text).data;
        select.textContent = "";
        if (!models.length) {
          select.append(new Option("no model is served in your regions", ""));
          return;
        }
        models.forEach(function (m) { select.append(new Option(m.id, m.id)); });
      });
    }).catch(function (error) { showError(error.message); });
  }

  function showError(message) {
    var box = $("playground-error") || document.createElement("p");
    box.id = "playground-error"; box.className = "error"; box.setAttribute("role", "alert");
    box.textContent = message;
    $("chat").append(box);
  }

  function addTurn(role, text) {
    var empty = $("chat-empty");
    if (empty) empty.remove();
    var turn = document.createElement("div");
    turn.className = "turn " + role;
    var body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    turn.append(body);
    $("chat").append(turn);
    return turn;
  }

  function money(micros, currency) { return (micros / 1e6).toFixed(6) + " " + currency; }

  function showCost(meta, requestId, tries) {
    fetch("/console/playground/requests/" + encodeURIComponent(requestId)).then(function (response) {
      if (response.status === 404 && tries > 0) {
        setTimeout(function () { showCost(meta, requestId, tries - 1); }, 500);
        return null;
      }
      return response.ok ? response.json() : null;
    }).then(function (row) {
      if (!row) return;
      meta.textContent = row.input_tokens + " tokens in, " + row.output_tokens + " out · cost " +
        money(row.cost_micros, row.currency) + (row.charged ? "" : " (not charged to a balance)") +
        " · " + requestId;
    });
  }

  function send(event) {
    event.preventDefault();
    var settings = $("settings"), compose = $("compose");
    var text = compose.message.value.trim();
    if (!text || !settings.model.value) return;
    var old = $("playground-error");
    if (old) old.remove();
    history.push({ role: "user", content: text });
    addTurn("user", text);
    compose.message.value = "";
    var answer = addTurn("assistant", "");
    var body = answer.querySelector(".text");
    var meta = document.createElement("span");
    meta.className = "meta"; meta.textContent = "…";
    answer.append(meta);
    var messages = settings.system.value.trim() ? [{ role: "system", content: settings.system.value.trim() }] : [];
    var request = { model: settings.model.value, messages: messages.concat(history), stream: true,
                    stream_options: { include_usage: true },
                    temperature: parseFloat(settings.temperature.value),
                    max_tokens: parseInt(settings.max_tokens.value, 10) };
    $("send").disabled = true; $("status").textContent = "streaming…";
    var usage = null, requestId = null;
    fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request) })
      .then(function (response) {
        requestId = response.headers.get("x-request-id");
        if (!response.ok) return response.text().then(function (t) { throw new Error(problem(t, response.status)); });
        var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
        function pump() {
          return reader.read().then(function (part) {
            if (part.done) return;
            buffer += decoder.decode(part.value, { stream: true });
            var events = buffer.split("\n\n");
            buffer = events.pop();
            events.forEach(function (event) {
              var data = event.replace(/^data: ?/, "");
              if (!data || data === "[DONE]") return;
              var chunk = JSON.parse(data);
              if (chunk.error) throw new Error(chunk.error.message);
              if (chunk.usage) usage = chunk.usage;
              (chunk.choices || []).forEach(function (choice) {
                if (choice.delta && choice.delta.content) body.textContent += choice.delta.content;
              });
            });
            return pump();
          });
        }
        return pump();
      })
      .then(function () {
        history.push({ role: "assistant", content: body.textContent });
        meta.textContent = usage ? usage.prompt_tokens + " tokens in, " + usage.completion_tokens + " out" : "";
        if (requestId) showCost(meta, requestId, 6);
      })
      .catch(function (error) {
        history.pop();
        answer.remove();
        showError(error.message);
      })
      .finally(function () { $("send").disabled = false; $("status").textContent = ""; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!key()) {
      $("key-needed").hidden = false;
      $("key-form").addEventListener("submit", function (event) {
        event.preventDefault();
        sessionStorage.setItem(KEY, event.target.key.value.trim());
        $("key-needed").hidden = true;
        loadModels();
      });
    } else {
      loadModels();
    }
    $("compose").addEventListener("submit", send);
    $("clear").addEventListener("click", function () {
      history = [];
      $("chat").textContent = "";
    });
  });
})();
