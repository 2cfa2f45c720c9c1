// Serai console: times in the browser's zone, charts, and the key the playground uses.
// No inline scripts anywhere (the pages' Content-Security-Policy forbids them): pages carry a
// chart's data as JSON in a <template> read here, which htmx keeps when it refreshes a panel
// (it drops every <script> it swaps in: allowScriptTags is off).
(function () {
  "use strict";
  var KEY = "serai.console.key";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      if (el.dataset.localized) return;
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) return;
      el.title = el.getAttribute("datetime");
      el.textContent = when.toLocaleString();
      el.dataset.localized = "1";
    });
  }

  function charts(root) {
    root.querySelectorAll("[data-chart]").forEach(function (el) {
      var source = document.getElementById(el.dataset.chart);
      if (!source || typeof uPlot === "undefined") return;
      var data = JSON.parse(source.content.textContent);
      el.textContent = "";
      if (!data.x.length) return;
      var palette = ["#1f5fbf", "#1b7f3b", "#b3261e", "#8a5a00", "#6a3fb5", "#00727a"];
      var series = [{}].concat(data.series.map(function (s, i) {
        return { label: s.label, stroke: palette[i % palette.length], width: 2,
                 fill: palette[i % palette.length] + "22", points: { show: true } };
      }));
      var opts = { width: Math.max(320, el.clientWidth || 800), height: 280, series: series,
                   axes: [{}, { label: data.unit || "" }], scales: { x: { time: true } } };
      new uPlot(opts, [data.x].concat(data.series.map(function (s) { return s.values; })), el);
    });
  }

  function ready(root) { localTimes(root); charts(root); }

  document.addEventListener("DOMContentLoaded", function () {
    ready(document);
    var signin = document.getElementById("signin");
    if (signin) {
      // The playground calls the public API with this key; it stays in this tab only.
      signin.addEventListener("submit", function () {
        sessionStorage.setItem(KEY, signin.querySelector("[name=key]").value.trim());
      });
    }
    document.querySelectorAll("form[action='/console/logout']").forEach(function (form) {
      form.addEventListener("submit", function () { sessionStorage.removeItem(KEY); });
    });
    document.body.addEventListener("click", function (event) {
      var button = event.target.closest("[data-copy]");
      if (!button) return;
      var target = document.getElementById(button.dataset.copy);
      if (target && navigator.clipboard) navigator.clipboard.writeText(target.textContent.trim());
    });
  });
  document.addEventListener("htmx:load", function (event) { ready(event.target); });
  document.addEventListener("htmx:responseError", function (event) {
    // An htmx request that failed: show the server's message instead of nothing.
    var box = document.querySelector("main .error[data-htmx]") || document.createElement("p");
    box.className = "error"; box.dataset.htmx = "1"; box.setAttribute("role", "alert");
    box.textContent = "The server answered " + event.detail.xhr.status + ". Reload the page and try again.";
    document.querySelector("main").prepend(box);
  });
})();
