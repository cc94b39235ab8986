// funboost_like dashboard: live numbers and charts from the JSON API, and the purge confirmation.
// Served from the package (no asset from the internet); the pages have no inline script (CSP).
"use strict";

(function () {
  var HISTORY = 90, PERIOD_MS = 2000;

  function fmt(value) {
    if (value === null || value === undefined) return "-";
    if (value === true) return "yes";
    if (value === false) return "no";
    return String(value);
  }

  function fill(cells, row) {
    cells.forEach(function (cell) {
      var name = cell.getAttribute("data-field");
      if (Object.prototype.hasOwnProperty.call(row, name)) {
        var text = name === "first_seen" ? cell.textContent : fmt(row[name]);
        if (cell.textContent !== text) cell.textContent = text;
      }
    });
  }

  function drawChart(canvas, points) {
    var ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px sans-serif";
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(pad, 6, w - 2 * pad, h - pad);
    if (points.length < 2) return;
    var rateMax = 1, depthMax = 1;
    points.forEach(function (p) {
      rateMax = Math.max(rateMax, p.done, p.failed);
      depthMax = Math.max(depthMax, p.depth);
    });
    function line(key, max, color) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      points.forEach(function (p, i) {
        var x = pad + (w - 2 * pad) * i / (points.length - 1);
        var y = 6 + (h - pad) * (1 - p[key] / max);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    }
    line("done", rateMax, "#2a7");
    line("failed", rateMax, "#c33");
    line("depth", depthMax, "#36c");
    ctx.fillStyle = "#555";
    ctx.fillText(rateMax.toFixed(1) + "/s", 2, 14);
    ctx.fillText(String(depthMax), w - pad + 2, 14);
    ctx.fillText("last " + Math.round(points.length * PERIOD_MS / 1000) + " s", pad, h - 8);
  }

  function poll(source, onData) {
    function once() {
      fetch(source, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (r.status === 401) { window.location.href = "/login"; throw new Error("logged out"); }
          return r.json();
        })
        .then(onData)
        .catch(function () { /* the next poll tries again */ })
        .finally(function () { window.setTimeout(once, PERIOD_MS); });
    }
    once();
  }

  function start() {
    var canvas = document.getElementById("chart");
    var points = [];
    function record(done, failed, depth) {
      points.push({ done: done || 0, failed: failed || 0, depth: depth || 0 });
      if (points.length > HISTORY) points.shift();
      if (canvas) drawChart(canvas, points);
    }
    var queues = document.getElementById("queues");
    if (queues) {
      poll(queues.getAttribute("data-source"), function (data) {
        var done = 0, failed = 0, depth = 0;
        data.queues.forEach(function (row) {
          done += row.done_per_second; failed += row.failed_per_second; depth += row.depth || 0;
          queues.querySelectorAll("tr[data-queue]").forEach(function (tr) {
            if (tr.getAttribute("data-queue") === row.queue) fill(tr.querySelectorAll("td[data-field]"), row);
          });
        });
        record(done, failed, depth);
      });
    }
    var status = document.getElementById("status");
    if (status) {
      poll(status.getAttribute("data-source"), function (row) {
        row.p50_seconds = row.run_times ? row.run_times.p50 : null;
        row.p95_seconds = row.run_times ? row.run_times.p95 : null;
        fill(status.querySelectorAll("td[data-field]"), row);
        record(row.done_per_second, row.failed_per_second, row.depth);
      });
    }
    document.querySelectorAll("input[data-confirm]").forEach(function (input) {
      var button = input.form.querySelector("button");
      input.addEventListener("input", function () {
        button.disabled = input.value !== input.getAttribute("data-confirm");
      });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
