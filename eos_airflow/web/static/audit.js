// The audit page: reads the JSON API next to it and draws the table, the timeline and an
// inline SVG chart. No framework, no network access beyond this api-server.
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("eos-config").textContent);
  var base = config.base;
  var SERIES = [["commits", "#137333"], ["skips", "#1a73e8"], ["fences", "#b06000"],
                ["failures", "#b3261e"]];

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function get(path, params) {
    var query = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) { if (params[k]) query.set(k, params[k]); });
    var url = base + path + (query.toString() ? "?" + query : "");
    return fetch(url, {credentials: "same-origin"}).then(function (r) {
      if (!r.ok) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          throw new Error(r.status + " " + (body.detail || r.statusText));
        });
      }
      return r.json();
    });
  }

  function fail(err) { document.getElementById("error").textContent = String(err); }

  function when(value) { return value ? new Date(value).toLocaleString() : ""; }

  function showVerify() {
    var out = document.getElementById("verify");
    get("/api/verify").then(function (v) {
      out.className = v.ok ? "ok" : "bad";
      out.textContent = v.ok
        ? "intact — " + v.events + " events of " + v.keys + " keys"
        : "FAILED — " + v.problems + " problem(s); first: " + v.first_bad;
    }).catch(function (err) { out.className = "muted"; out.textContent = String(err); });
  }

  function timeline(found) {
    var entry = found.entry;
    var rows = found.events.map(function (e) {
      return el("tr", {"class": "event"}, [
        el("td", {}, [String(e.seq)]), el("td", {}, [e.event]), el("td", {}, [String(e.attempt)]),
        el("td", {}, [when(e.at)]), el("td", {"class": "mono"}, [JSON.stringify(e.detail)]),
        el("td", {"class": "mono"}, [e.hash.slice(0, 16) + "…"])]);
    });
    return el("div", {"class": "timeline", "data-key": entry.key}, [
      el("h2", {}, ["Entry ", el("code", {}, [entry.key])]),
      el("p", {}, ["state ", el("strong", {"class": "state-" + entry.state}, [entry.state]),
                   ", version " + entry.version + ", attempt " + entry.attempt +
                   ", last run " + (entry.run_id || "—") + ", committed " +
                   (when(entry.committed_at) || "never") + ", result ",
                   el("code", {}, [JSON.stringify(entry.result)])]),
      el("table", {}, [el("thead", {}, [el("tr", {}, ["seq", "event", "attempt", "at", "detail",
        "hash"].map(function (h) { return el("th", {}, [h]); }))]), el("tbody", {}, rows)])]);
  }

  function showEntry(key) {
    get("/api/entry", {key: key}).then(function (found) {
      var detail = document.getElementById("detail");
      detail.replaceChildren(timeline(found));
      detail.scrollIntoView();
    }).catch(fail);
  }

  function showEntries(filters) {
    get("/api/entries", filters).then(function (data) {
      var body = document.querySelector("#entries tbody");
      body.replaceChildren.apply(body, data.entries.map(function (e) {
        var row = el("tr", {"class": "entry", "data-key": e.key}, [
          el("td", {"class": "mono"}, [e.key]),
          el("td", {"class": "state-" + e.state}, [e.state]), el("td", {}, [String(e.version)]),
          el("td", {}, [String(e.attempt)]), el("td", {}, [e.dag_id || ""]),
          el("td", {}, [e.task_id || ""]), el("td", {"class": "mono"}, [e.run_id || ""]),
          el("td", {}, [when(e.committed_at)])]);
        row.addEventListener("click", function () { showEntry(e.key); });
        return row;
      }));
      if (!data.entries.length) {
        body.appendChild(el("tr", {}, [el("td", {colspan: "8", "class": "muted"},
                                          ["no entries match"])]));
      }
    }).catch(fail);
  }

  function showChart(bucket) {
    var legend = document.getElementById("legend");
    legend.replaceChildren.apply(legend, SERIES.map(function (s) {
      return el("span", {}, [el("span", {"class": "swatch", style: "background:" + s[1]}), s[0]]);
    }));
    var span = bucket === "day" ? 30 : 48;  // buckets shown: 30 days or 48 hours
    get("/api/activity", {bucket: bucket, since: span + (bucket === "day" ? "d" : "h")})
      .then(function (data) { drawChart(fillBuckets(data.series, bucket, span)); })
      .catch(fail);
  }

  // One slot per hour (or day) up to now, zero where nothing happened.
  function fillBuckets(series, bucket, span) {
    var step = bucket === "day" ? 86400000 : 3600000;
    var byTime = {};
    series.forEach(function (p) { byTime[Math.floor(Date.parse(p.bucket + "Z") / step)] = p; });
    var last = Math.floor(Date.now() / step), out = [];
    for (var t = last - span + 1; t <= last; t++) {
      var p = byTime[t] || {commits: 0, skips: 0, fences: 0, failures: 0};
      out.push(Object.assign({}, p, {bucket: new Date(t * step).toISOString().slice(0, 16)}));
    }
    return out;
  }

  function drawChart(series) {
    var ns = "http://www.w3.org/2000/svg";
    var width = 900, height = 180, pad = 30;
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", "100%");
    svg.setAttribute("id", "activity-chart");
    var max = 1;
    series.forEach(function (p) {
      max = Math.max(max, p.commits + p.skips + p.fences + p.failures);
    });
    var slot = (width - 2 * pad) / Math.max(series.length, 1);
    series.forEach(function (p, i) {
      var y = height - pad;
      SERIES.forEach(function (s) {
        var h = (p[s[0]] / max) * (height - 2 * pad);
        if (!h) { return; }
        var bar = document.createElementNS(ns, "rect");
        bar.setAttribute("x", pad + i * slot + 1);
        bar.setAttribute("y", y - h);
        bar.setAttribute("width", Math.max(slot - 2, 1));
        bar.setAttribute("height", h);
        bar.setAttribute("fill", s[1]);
        bar.setAttribute("class", "bar-" + s[0]);
        var title = document.createElementNS(ns, "title");
        title.textContent = p.bucket + ": " + p[s[0]] + " " + s[0];
        bar.appendChild(title);
        svg.appendChild(bar);
        y -= h;
      });
    });
    var axis = document.createElementNS(ns, "line");
    axis.setAttribute("x1", pad); axis.setAttribute("x2", width - pad);
    axis.setAttribute("y1", height - pad); axis.setAttribute("y2", height - pad);
    axis.setAttribute("stroke", "#9aa5b1");
    svg.appendChild(axis);
    var label = document.createElementNS(ns, "text");
    label.setAttribute("x", 2); label.setAttribute("y", pad - 10);
    label.setAttribute("font-size", "11");
    label.textContent = "max " + max + " events per bucket";
    svg.appendChild(label);
    [[0, "start"], [series.length - 1, "end"]].forEach(function (edge) {
      if (!series.length) { return; }
      var tick = document.createElementNS(ns, "text");
      tick.setAttribute("x", edge[1] === "start" ? pad : width - pad);
      tick.setAttribute("y", height - pad + 14);
      tick.setAttribute("font-size", "11");
      tick.setAttribute("text-anchor", edge[1]);
      tick.textContent = series[edge[0]].bucket.replace("T", " ") + " UTC";
      svg.appendChild(tick);
    });
    document.getElementById("chart").replaceChildren(svg);
  }

  function tiView(ti) {
    document.getElementById("audit-view").hidden = true;
    document.getElementById("title").textContent =
      "Exactly-once: " + ti.dag_id + " / " + ti.task_id + " / " + ti.run_id +
      (ti.map_index >= 0 ? " [" + ti.map_index + "]" : "");
    var path = "/api/ti/" + [ti.dag_id, ti.run_id, ti.task_id, String(ti.map_index)]
      .map(encodeURIComponent).join("/");
    get(path).then(function (data) {
      var detail = document.getElementById("detail");
      if (!data.entries.length) {
        detail.replaceChildren(el("p", {"class": "muted"},
          ["This task instance has no ledger entry (it is not an exactly-once task, or it " +
           "has not claimed its key yet)."]));
        return;
      }
      detail.replaceChildren.apply(detail, data.entries.map(timeline));
    }).catch(fail);
  }

  showVerify();
  if (config.view === "ti") {
    tiView(config.ti);
  } else {
    showChart("hour");
    showEntries({});
    document.getElementById("filters").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var form = new FormData(ev.target);
      var filters = {};
      form.forEach(function (v, k) { filters[k] = v; });
      showEntries(filters);
    });
  }
})();
