// kakuremichi dashboard: copy buttons, confirmations, the tunnel form's fields, and
// live updates over Server-Sent Events (/events). The pages work without it.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  function say(text) { if (status) { status.textContent = text; } }

  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var source = document.getElementById(button.getAttribute("data-copy"));
      if (!source) { return; }
      var text = source.textContent;
      function done() {
        button.textContent = "Copied";
        say("Copied to the clipboard");
        setTimeout(function () { button.textContent = "Copy"; }, 2000);
      }
      function fallback() {
        var range = document.createRange();
        range.selectNodeContents(source);
        var selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        try { document.execCommand("copy"); done(); } catch (e) { say("Select the text and copy it"); }
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, fallback);
      } else { fallback(); }
    });
  });

  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });

  var protocol = document.getElementById("protocol");
  if (protocol) {
    var sync = function () {
      var http = protocol.value === "http";
      document.getElementById("by-domain").hidden = !http;
      document.getElementById("by-port").hidden = http;
    };
    protocol.addEventListener("change", sync);
    sync();
  }

  if (!document.body.hasAttribute("data-live") || !window.EventSource) { return; }
  function each(selector, fn) { document.querySelectorAll(selector).forEach(fn); }
  function setBadge(el, state, text) {
    el.className = "badge " + state;
    el.textContent = text;
  }
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }
  // from the newest event this page reflects; a reconnect resumes at the last one seen
  var source = new EventSource("/events?after=" + document.body.getAttribute("data-events-after"));
  source.addEventListener("open", function () { say("Live: updates appear without reloading"); });
  source.addEventListener("error", function () { say("Live updates paused; reconnecting"); });
  source.addEventListener("presence", function (event) {
    var data = JSON.parse(event.data);
    each('[data-presence="' + data.kind + ":" + data.id + '"]', function (el) {
      setBadge(el, data.online ? "online" : "offline", data.online ? "online" : "offline");
    });
    each('[data-online-count="' + data.kind + '"]', function (el) {
      el.textContent = String(document.querySelectorAll(
        '[data-presence^="' + data.kind + ':"].online').length);
    });
    say(data.kind + " " + (data.online ? "came online" : "went offline"));
  });
  source.addEventListener("health", function (event) {
    var data = JSON.parse(event.data);
    each('[data-health="' + data.id + '"]', function (el) {
      setBadge(el, data.health, data.health);
      el.title = data.detail || "";
    });
  });
  source.addEventListener("traffic", function (event) {
    var data = JSON.parse(event.data);
    each('[data-traffic="' + data.id + '"]', function (el) {
      var field = el.getAttribute("data-field");
      var value = data[field];
      el.textContent = field.indexOf("bytes") === 0 ? bytes(value) : String(value);
    });
    each('img[data-chart="' + data.id + '"]', function (img) {
      img.src = "/tunnels/" + data.id + "/chart.svg?t=" + Date.now();
    });
  });
  source.addEventListener("change", function () {
    var note = document.getElementById("changed");
    if (note) { note.hidden = false; }
  });
  source.addEventListener("overflow", function () { window.location.reload(); });
})();
