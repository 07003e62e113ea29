/* taskd's dashboard: shows each <time> in the browser's own zone and names that zone.
   Runs on load and after htmx swaps a live part of the page in. */
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
  document.addEventListener("DOMContentLoaded", function () { localize(document); });
  document.addEventListener("htmx:afterSwap", function (event) { localize(event.target); });
})();
