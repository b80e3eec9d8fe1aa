// The annotation gallery (seglab.curate.gallery): cards paginated over the export's objects,
// answers yes / no / unsure by click and by key, kept in localStorage under the export id,
// exported as a seglab-answers/1 file (a Blob download) and imported again (merged).
// No network: the record comes from gallery-data.js, crops are relative files.
(function () {
  "use strict";
  var G = window.SEGLAB_GALLERY;
  var FORMAT = "seglab-answers/1";
  var VALUES = ["yes", "no", "unsure"];
  var KEY = "seglab-answers:" + G.export_id;
  var byId = {};
  G.objects.forEach(function (o, i) { o._order = i; byId[o.object_id] = o; });
  var state = loadState();
  var view = { page: 1, sort: "default", show: "all", areaMin: null, areaMax: null, confMin: null, confMax: null };
  var list = [];
  var focus = 0;
  var $ = function (id) { return document.getElementById(id); };

  function loadState() {
    var s = null;
    try { s = JSON.parse(window.localStorage.getItem(KEY) || "null"); } catch (e) { s = null; }
    if (!s || typeof s !== "object" || typeof s.answers !== "object") { s = { annotator: "", answers: {} }; }
    return s;
  }
  function saveState() {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); }
    catch (e) { say("Answers could not be saved in this browser's storage (" + e + "); export them now.", true); }
  }
  function say(text, error) {
    var m = $("message");
    m.textContent = text;
    m.className = error ? "error" : "ok";
  }

  // ---------------------------------------------------------------- the list shown
  function num(id) { var v = $(id).value; return v === "" ? null : Number(v); }
  function rebuild(keepPage) {
    view.areaMin = num("area-min"); view.areaMax = num("area-max");
    view.confMin = num("conf-min"); view.confMax = num("conf-max");
    view.show = $("show").value; view.sort = $("sort").value;
    list = G.objects.filter(function (o) {
      var a = state.answers[o.object_id];
      if (view.areaMin !== null && o.area_um2 < view.areaMin) return false;
      if (view.areaMax !== null && o.area_um2 > view.areaMax) return false;
      if (G.has_confidence) {
        var c = o.classifier_confidence;
        if (view.confMin !== null && !(c !== null && c >= view.confMin)) return false;
        if (view.confMax !== null && !(c !== null && c <= view.confMax)) return false;
      }
      if (view.show === "unanswered") return !a;
      if (view.show !== "all") return a === view.show;
      return true;
    });
    var key = { "area-asc": function (o) { return o.area_um2; }, "area-desc": function (o) { return -o.area_um2; },
                "conf-asc": function (o) { return o.classifier_confidence === null ? Infinity : o.classifier_confidence; },
                "conf-desc": function (o) { return o.classifier_confidence === null ? Infinity : -o.classifier_confidence; } }[view.sort];
    list.sort(function (a, b) {
      if (key) { var d = key(a) - key(b); if (d) return d; }
      return a._order - b._order;
    });
    if (!keepPage) { view.page = 1; focus = 0; }
    render();
  }
  function nPages() { return Math.max(1, Math.ceil(list.length / G.per_page)); }

  // ---------------------------------------------------------------- drawing
  function fmt(v) { return v === null || v === undefined ? "-" : (Math.abs(v) >= 100 ? v.toFixed(1) : Number(v.toPrecision(3)).toString()); }
  function card(o) {
    var d = document.createElement("div");
    d.className = "card";
    d.tabIndex = -1;
    d.setAttribute("data-id", o.object_id);
    var img = document.createElement("img");
    img.src = o.crop; img.alt = o.object_id; img.width = G.crop_px; img.height = G.crop_px;
    d.appendChild(img);
    var t = document.createElement("div"); t.className = "oid"; t.textContent = o.object_id; d.appendChild(t);
    var a = document.createElement("div"); a.className = "area"; a.textContent = o.area_text; d.appendChild(a);
    var f = document.createElement("div"); f.className = "feat";
    var parts = G.feature_columns.filter(function (c) { return c !== "area_um2"; }).map(function (c) { return c + " " + fmt(o[c]); });
    if (G.has_confidence) parts.unshift("confidence " + fmt(o.classifier_confidence));
    f.textContent = parts.join(" \u00b7 ");
    d.appendChild(f);
    var b = document.createElement("div"); b.className = "buttons";
    VALUES.forEach(function (v) {
      var btn = document.createElement("button");
      btn.type = "button"; btn.setAttribute("data-a", v); btn.textContent = v;
      btn.addEventListener("click", function () { answer(o.object_id, v); setFocus(cardsOnPage().indexOf(d)); });
      b.appendChild(btn);
    });
    d.appendChild(b);
    d.addEventListener("click", function (ev) { if (ev.target.tagName !== "BUTTON") setFocus(cardsOnPage().indexOf(d)); });
    paint(d);
    return d;
  }
  function paint(d) {
    var a = state.answers[d.getAttribute("data-id")];
    d.classList.remove("ans-yes", "ans-no", "ans-unsure");
    if (a) d.classList.add("ans-" + a);
    d.setAttribute("data-answer", a || "");
  }
  function cardsOnPage() { return Array.prototype.slice.call(document.querySelectorAll("#cards .card")); }
  function render() {
    view.page = Math.min(Math.max(1, view.page), nPages());
    var main = $("cards");
    main.textContent = "";
    var start = (view.page - 1) * G.per_page;
    list.slice(start, start + G.per_page).forEach(function (o) { main.appendChild(card(o)); });
    $("pageinfo").textContent = "page " + view.page + " of " + nPages() + " (" + list.length + " shown of " + G.objects.length + ")";
    document.body.setAttribute("data-page", String(view.page));
    document.body.setAttribute("data-pages", String(nPages()));
    if (location.hash !== "#page=" + view.page) history.replaceState(null, "", "#page=" + view.page);
    setFocus(Math.min(focus, cardsOnPage().length - 1));
    progress();
  }
  function progress() {
    var n = { yes: 0, no: 0, unsure: 0 }, total = 0;
    G.objects.forEach(function (o) { var a = state.answers[o.object_id]; if (a) { n[a] += 1; total += 1; } });
    $("progress").textContent = total + " / " + G.objects.length + " answered (yes " + n.yes + ", no " + n.no + ", unsure " + n.unsure + ")";
  }
  function setFocus(i) {
    var cards = cardsOnPage();
    if (!cards.length) { focus = 0; return; }
    focus = Math.max(0, Math.min(i, cards.length - 1));
    cards.forEach(function (c, k) { c.classList.toggle("focus", k === focus); });
    cards[focus].focus({ preventScroll: true });
    cards[focus].scrollIntoView({ block: "nearest" });
    document.body.setAttribute("data-focus", cards[focus].getAttribute("data-id"));
  }
  function perRow() {
    var cards = cardsOnPage();
    if (cards.length < 2) return 1;
    var top = cards[0].offsetTop, n = 0;
    while (n < cards.length && cards[n].offsetTop === top) n += 1;
    return Math.max(1, n);
  }
  function goPage(p) {
    var q = Math.min(Math.max(1, p), nPages());
    if (q === view.page) return;
    view.page = q; focus = 0; render();
  }

  // ---------------------------------------------------------------- answering
  function answer(id, v) {
    state.answers[id] = v;
    saveState();
    cardsOnPage().forEach(function (c) { if (c.getAttribute("data-id") === id) paint(c); });
    progress();
  }
  document.addEventListener("keydown", function (ev) {
    var tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var cards = cardsOnPage();
    var k = ev.key;
    if (k === "y" || k === "n" || k === "u") {
      if (!cards.length) return;
      answer(cards[focus].getAttribute("data-id"), { y: "yes", n: "no", u: "unsure" }[k]);
      setFocus(focus + 1);
    } else if (k === "ArrowRight") { setFocus(focus + 1); }
    else if (k === "ArrowLeft") { setFocus(focus - 1); }
    else if (k === "ArrowDown") { setFocus(focus + perRow()); }
    else if (k === "ArrowUp") { setFocus(focus - perRow()); }
    else if (k === "PageDown" || k === "]") { goPage(view.page + 1); }
    else if (k === "PageUp" || k === "[") { goPage(view.page - 1); }
    else { return; }
    ev.preventDefault();
  });

  // ---------------------------------------------------------------- export, import
  function answersFile() {
    var out = {};
    G.objects.forEach(function (o) { var a = state.answers[o.object_id]; if (a) out[o.object_id] = a; });
    return { format: FORMAT, export_id: G.export_id, segmentation_id: G.segmentation_id, area_filter: G.area_filter,
             cell_type: G.cell_type, annotator: state.annotator || "anonymous",
             saved_at: new Date().toISOString().replace(/\.\d{3}Z$/, "+00:00"), answers: out };
  }
  function safe(s) { return String(s).replace(/[^A-Za-z0-9._-]+/g, "_"); }
  $("export").addEventListener("click", function () {
    var data = answersFile();
    var blob = new Blob([JSON.stringify(data, null, 2) + "\n"], { type: "application/json" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "answers-" + safe(G.cell_type) + "-" + safe(data.annotator) + "-" + G.export_id.slice(0, 12) + ".json";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    say("Exported " + Object.keys(data.answers).length + " answers to " + a.download + ".", false);
  });
  function areaText(f) {
    if (!f || typeof f !== "object") return JSON.stringify(f);
    return (f.min_um2 === null || f.min_um2 === undefined ? "0" : f.min_um2) + "-" +
           (f.max_um2 === null || f.max_um2 === undefined ? "inf" : f.max_um2) + " um^2";
  }
  function sameArea(a, b) {
    if (!a || typeof a !== "object") return false;
    return ["min_um2", "max_um2"].every(function (k) {
      var x = a[k] === undefined ? null : a[k], y = b[k] === undefined ? null : b[k];
      return (x === null && y === null) || (x !== null && y !== null && Math.abs(x - y) <= 1e-9 * Math.max(1, Math.abs(y)));
    });
  }
  // the checks of seglab.curate.answers.check_answers: a refusal names the file and both sides
  function refusal(name, d) {
    if (!d || typeof d !== "object" || Array.isArray(d)) return name + ": not an answers file (a JSON object).";
    if (d.format !== FORMAT) return name + ": format " + JSON.stringify(d.format) + " is not " + FORMAT + ": not a gallery answers file.";
    if (d.segmentation_id !== G.segmentation_id) return name + ": answers made under segmentation " + d.segmentation_id + ", but this gallery shows segmentation " + G.segmentation_id + ". Open the gallery these answers were made on.";
    if (!sameArea(d.area_filter, G.area_filter)) return name + ": answers made under area filter " + areaText(d.area_filter) + ", but this gallery uses " + areaText(G.area_filter) + ". Open the gallery these answers were made on.";
    if (d.export_id !== G.export_id) return name + ": answers belong to gallery export " + String(d.export_id).slice(0, 12) + ", but this gallery is export " + G.export_id.slice(0, 12) + ". Open the gallery these answers were made on.";
    if (d.cell_type !== G.cell_type) return name + ": answers are for cell type " + d.cell_type + ", but this gallery is for " + G.cell_type + ".";
    if (!d.answers || typeof d.answers !== "object") return name + ": no answers in the file.";
    var ids = Object.keys(d.answers);
    var bad = ids.filter(function (k) { return VALUES.indexOf(d.answers[k]) < 0; });
    if (bad.length) return name + ": " + bad.length + " answer(s) are not yes, no or unsure (e.g. " + bad[0] + ").";
    var unknown = ids.filter(function (k) { return !byId[k]; });
    if (unknown.length) return name + ": " + unknown.length + " object id(s) are not in this gallery (" + unknown.slice(0, 5).join(", ") + (unknown.length > 5 ? ", ..." : "") + ").";
    return null;
  }
  function importText(name, text) {
    var d;
    try { d = JSON.parse(text); } catch (e) { say(name + ": malformed JSON (" + e.message + "); export the answers again.", true); return; }
    var why = refusal(name, d);
    if (why) { say(why, true); return; }
    var added = 0, same = 0, differ = [];
    Object.keys(d.answers).forEach(function (k) {
      var mine = state.answers[k];
      if (!mine) { state.answers[k] = d.answers[k]; added += 1; }
      else if (mine === d.answers[k]) { same += 1; }
      else { differ.push(k); }
    });
    if (!state.annotator && d.annotator) { state.annotator = d.annotator; $("annotator").value = d.annotator; }
    saveState();
    rebuild(true);
    say("Imported " + name + " (" + (d.annotator || "anonymous") + "): " + added + " new, " + same + " the same, " +
        differ.length + " disagree (yours kept)" + (differ.length ? ": " + differ.slice(0, 10).join(", ") + (differ.length > 10 ? ", ..." : "") : "") + ".", false);
    document.body.setAttribute("data-disagreements", differ.join(","));
  }
  $("import").addEventListener("change", function (ev) {
    var f = ev.target.files && ev.target.files[0];
    if (!f) return;
    var r = new FileReader();
    r.onload = function () { importText(f.name, String(r.result)); ev.target.value = ""; };
    r.onerror = function () { say(f.name + ": could not be read.", true); };
    r.readAsText(f);
  });

  // ---------------------------------------------------------------- set-up
  $("annotator").value = state.annotator || "";
  $("annotator").addEventListener("change", function () { state.annotator = $("annotator").value.trim(); saveState(); });
  ["area-min", "area-max", "conf-min", "conf-max"].forEach(function (id) { $(id).addEventListener("change", function () { rebuild(false); }); });
  ["show", "sort"].forEach(function (id) { $(id).addEventListener("change", function () { rebuild(false); }); });
  $("prev").addEventListener("click", function () { goPage(view.page - 1); });
  $("next").addEventListener("click", function () { goPage(view.page + 1); });
  if (G.has_confidence) {
    $("conf-filter").hidden = false;
    Array.prototype.forEach.call(document.querySelectorAll("#sort option[value^=conf]"), function (o) { o.disabled = false; });
  }
  $("meta").textContent = "cell type " + G.cell_type + " \u00b7 " + G.objects.length + " objects \u00b7 area filter " +
    G.area_filter_text + " \u00b7 segmentation " + G.segmentation_id + " \u00b7 export " + G.export_id.slice(0, 12) +
    " \u00b7 crops " + G.crop_px + " px (" + (G.crop_px * G.pixel_size_um).toFixed(1) + " um), yellow: this object";
  var m = /page=(\d+)/.exec(location.hash);
  rebuild(false);
  if (m) { view.page = Number(m[1]); render(); }
  document.body.setAttribute("data-ready", "1");
})();
