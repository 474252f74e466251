// The console's only script (served same-origin: the pages run under a strict CSP, no inline code).
// Pages are complete without it; it draws the charts (vendored uPlot) and keeps gate events live over the
// session's gate stream (/console/gates/stream), refreshing the parts of the page marked data-refresh-on-gate.
(function () {
  "use strict";
  var COLOURS = ["#2357c6", "#e07b00", "#1f9d6b", "#b3261e", "#7a4fc2", "#0096a8", "#8a6d00", "#c2185b"];
  var LIVE_ROWS_MAX = 50;
  var REFRESH_AFTER_MS = 700;

  function pad(n) { return (n < 10 ? "0" : "") + n; }
  // Token counts arrive as decimal strings too ("8500.000000000000"): shown as whole numbers with separators.
  function count(text) {
    var whole = String(text).split(".")[0];
    return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }
  function utcDay(seconds) {
    var d = new Date(seconds * 1000);
    return d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate());
  }
  function utcTime(iso) {
    var d = new Date(iso);
    if (isNaN(d)) { return iso; }
    return utcDay(d.getTime() / 1000) + " " + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" +
      pad(d.getUTCSeconds()) + " UTC";
  }
  // Amounts arrive as decimal strings: shown exactly, trailing zeros trimmed to two places.
  function amount(text) {
    if (text === null || text === undefined) { return "–"; }
    var s = String(text);
    if (s.indexOf(".") < 0) { return s + ".00"; }
    s = s.replace(/0+$/, "");
    var places = s.length - s.indexOf(".") - 1;
    return places < 2 ? s + "00".slice(places) : s;
  }

  // -- charts ----------------------------------------------------------------------------------------------------

  function widthOf(el) { return Math.max(280, el.clientWidth - 16); }

  function dayChart(spec, el) {
    // Stacked daily bars: series i is drawn as the sum of models 0..i, the tallest first, so each visible
    // segment is one model's spend; the legend shows each model's own figure.
    var n = spec.series.length;
    var cumulative = [];
    var running = spec.x.map(function () { return 0; });
    spec.series.forEach(function (s) {
      running = running.map(function (v, i) { return v + s.values[i]; });
      cumulative.push(running.slice());
    });
    var order = [];
    for (var k = n - 1; k >= 0; k--) { order.push(k); }
    var bars = uPlot.paths.bars({ size: [0.7, 80] });
    var series = [{ label: "day (UTC)", value: function (u, v) { return v == null ? "–" : utcDay(v); } }];
    order.forEach(function (k) {
      series.push({
        label: spec.series[k].label, fill: COLOURS[k % COLOURS.length], stroke: COLOURS[k % COLOURS.length],
        paths: bars, points: { show: false },
        value: function (u, v, si, i) { return i == null ? "–" : spec.series[k].values[i].toFixed(6) + " " + spec.unit; }
      });
    });
    var first = spec.x[0], last = spec.x[spec.x.length - 1];
    return {
      opts: {
        title: spec.title, width: widthOf(el), height: 300, series: series,
        scales: { x: { time: false, range: function () { return [first - 43200, last + 43200]; } } },
        axes: [
          { splits: function (u) {
              var every = Math.max(1, Math.ceil(spec.x.length / Math.max(1, Math.floor(u.width / 90))));
              return spec.x.filter(function (_x, i) { return i % every === 0; });
            },
            values: function (u, ticks) { return ticks.map(utcDay); } },
          { label: spec.unit, size: 60 }
        ]
      },
      data: [spec.x].concat(order.map(function (k) { return cumulative[k]; }))
    };
  }

  function barChart(spec, el) {
    var n = spec.series.length;
    var xs = spec.labels.map(function (_l, i) { return i; });
    var series = [{ label: "", value: function (u, v) { return v == null ? "–" : spec.labels[v]; } }];
    spec.series.forEach(function (s, k) {
      var align = n === 1 ? 0 : (k === 0 ? -1 : 1);
      series.push({
        label: s.label, fill: COLOURS[k % COLOURS.length], stroke: COLOURS[k % COLOURS.length], points: { show: false },
        paths: uPlot.paths.bars({ size: [n === 1 ? 0.6 : 0.4, 80], align: align }),
        value: function (u, v) { return v == null ? "–" : v + " " + spec.unit; }
      });
    });
    return {
      opts: {
        title: spec.title, width: widthOf(el), height: 300, series: series,
        scales: { x: { time: false, range: function () { return [-0.5, xs.length - 0.5]; } },
                  y: { range: function (u, min, max) { return [Math.min(0, min), Math.max(max, 1) * 1.1]; } } },
        axes: [
          { splits: function () { return xs; }, values: function (u, ticks) { return ticks.map(function (t) { return spec.labels[t]; }); } },
          { label: spec.unit, size: 60 }
        ]
      },
      data: [xs].concat(spec.series.map(function (s) { return s.values; }))
    };
  }

  function drawCharts() {
    if (!window.uPlot) { return; }
    var figures = document.querySelectorAll("figure.chart[data-chart]");
    Array.prototype.forEach.call(figures, function (el) {
      var spec = JSON.parse(el.getAttribute("data-chart"));
      var built = spec.kind === "days" ? dayChart(spec, el) : barChart(spec, el);
      var plot = new uPlot(built.opts, built.data, el);
      el.classList.add("drawn");
      window.addEventListener("resize", function () { plot.setSize({ width: widthOf(el), height: 300 }); });
    });
  }

  // -- live gate events ------------------------------------------------------------------------------------------

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    if (text instanceof Node) { td.appendChild(text); } else { td.textContent = text; }
    row.appendChild(td);
    return td;
  }

  function addGateRow(tbody, gate, links) {
    var empty = tbody.querySelector("tr.empty");
    if (empty) { empty.remove(); }
    var row = document.createElement("tr");
    row.className = gate.kind + " fresh";
    row.setAttribute("data-gate-id", gate.gate_id);
    cell(row, utcTime(gate.occurred_at));
    var who = document.createTextNode(gate.user);
    if (links[gate.user]) { who = document.createElement("a"); who.href = links[gate.user]; who.textContent = gate.user; }
    cell(row, who);
    var badge = document.createElement("span");
    badge.className = "badge " + gate.kind;
    badge.textContent = gate.kind.replace(/_/g, " ");
    cell(row, badge);
    cell(row, gate.dimension + (gate.model ? ":" + gate.model : ""));
    var shown = gate.dimension === "model_tokens" ? count : amount;
    cell(row, shown(gate.used), "num");
    cell(row, shown(gate.limit), "num");
    tbody.insertBefore(row, tbody.firstChild);
    while (tbody.rows.length > LIVE_ROWS_MAX) { tbody.deleteRow(tbody.rows.length - 1); }
  }

  // Parts of the page marked data-refresh-on-gate are replaced by the same parts of a fresh copy of the page.
  var refreshTimer = null;
  function refreshMarked() {
    if (refreshTimer) { return; }
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html");
          document.querySelectorAll("[data-refresh-on-gate][id]").forEach(function (el) {
            var next = fresh.getElementById(el.id);
            if (next) { el.replaceWith(document.importNode(next, true)); }
          });
          document.body.setAttribute("data-refreshed", String(Date.now()));
        })
        .catch(function () { /* the next gate event tries again */ });
    }, REFRESH_AFTER_MS);
  }

  function liveGates() {
    var tbody = document.getElementById("gate-rows");
    var watched = document.querySelectorAll("[data-refresh-on-gate]");
    if (!window.EventSource || (!tbody && !watched.length)) { return; }
    var status = document.getElementById("live-status");
    var links = tbody ? JSON.parse(tbody.getAttribute("data-user-links") || "{}") : {};
    var stream = new EventSource("/console/gates/stream");
    function say(state, text) { if (status) { status.setAttribute("data-state", state); status.textContent = text; } }
    stream.onopen = function () { say("live", "live"); };
    stream.onerror = function () { say("retrying", "reconnecting…"); };
    stream.addEventListener("gate", function (event) {
      var gate = JSON.parse(event.data);
      if (tbody && !tbody.querySelector('[data-gate-id="' + gate.gate_id + '"]')) { addGateRow(tbody, gate, links); }
      var mine = Array.prototype.some.call(watched, function (el) {
        var user = el.getAttribute("data-user");
        return !user || user === gate.user;
      });
      if (mine) { refreshMarked(); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () { drawCharts(); liveGates(); });
})();
