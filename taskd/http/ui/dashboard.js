/* taskd's dashboard: shows each <time> in the browser's own zone and names that zone, and
   puts a running job's progress and log lines on its page as their events come. */
(function () {
  "use strict";
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });

  function localize(root) {
    root.querySelectorAll("time[datetime]:not([data-local])").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (isNaN(moment)) return;
      el.title = el.textContent;
      el.textContent = format.format(moment);
      el.setAttribute("data-local", "");
    });
    document.querySelectorAll(".zone").forEach(function (el) { el.textContent = zone; });
  }

  function timeElement(seconds) {
    var el = document.createElement("time");
    el.setAttribute("datetime", new Date(seconds * 1000).toISOString());
    el.textContent = el.getAttribute("datetime");
    return el;
  }

  function showLine(line) {
    var list = document.querySelector("#live ol.log");
    var key = line.epoch + "." + line.seq;
    if (!list || list.querySelector('[data-line="' + key + '"]')) return;
    var item = document.createElement("li");
    var level = document.createElement("span");
    item.setAttribute("data-line", key);
    level.className = "level";
    level.textContent = line.level;
    item.append(timeElement(line.at), " ", level, " " + line.message);
    list.append(item);
    while (list.children.length > 1000) list.firstElementChild.remove();  // a chatty job
    localize(item);
  }

  function showProgress(progress) {
    var line = document.getElementById("job-progress");
    var bar = document.getElementById("progress");
    if (!line || !bar) return;
    var text = String(progress.done);
    if (progress.total) {
      bar.max = progress.total;
      bar.value = progress.done;
      text += " of " + progress.total;
    }
    if (progress.message) text += " — " + progress.message;
    document.getElementById("progress-text").textContent = text;
    line.hidden = false;
  }

  document.addEventListener("htmx:sseMessage", function (event) {
    var message = event.detail;
    var live = document.getElementById("live");
    if (!message || !live || !live.dataset.job) return;
    if (message.type !== "log" && message.type !== "progress") return;
    var data;
    try { data = JSON.parse(message.data); } catch (error) { return; }
    if (String(data.job_id) !== live.dataset.job) return;
    if (data.kind === "log" && data.line) showLine(data.line);
    if (data.kind === "progress" && data.progress) showProgress(data.progress);
  });
  function connection(state) {
    return function () {
      document.querySelectorAll(".connection").forEach(function (el) { el.textContent = state; });
    };
  }
  document.addEventListener("htmx:sseOpen", connection("live"));
  document.addEventListener("htmx:sseError", connection("reconnecting…"));
  document.addEventListener("DOMContentLoaded", function () { localize(document); });
  document.addEventListener("htmx:afterSwap", function (event) { localize(event.target); });
})();
