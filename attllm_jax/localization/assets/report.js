// attllm-localize report: draws the database cloud, estimates, uncertainty circles and top-K lines in an SVG,
// in Web Mercator pixels at one zoom level (the same frame as the optional basemap tiles). No network request.
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const SVGNS = "http://www.w3.org/2000/svg";
const TILE = 256;
function mercator(lat, lon, zoom) {
  const s = Math.sin(lat * Math.PI / 180), world = TILE * Math.pow(2, zoom);
  return [(lon + 180) / 360 * world, (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * world];
}
function metresPerPixel(lat, zoom) { return 156543.03392 * Math.cos(lat * Math.PI / 180) / Math.pow(2, zoom); }
function colour(c) {
  if (c === null) return "#7a7a9a";
  const hue = Math.round(120 * Math.max(0, Math.min(1, c)));  // red (0) .. green (1)
  return "hsl(" + hue + ",80%,40%)";
}
function el(name, attrs, parent) {
  const node = document.createElementNS(SVGNS, name);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(node);
  return node;
}
const W = 900, H = 650;
function chooseZoom(points) {
  for (let z = 21; z > 0; z--) {
    const xy = points.map(p => mercator(p[0], p[1], z));
    const xs = xy.map(p => p[0]), ys = xy.map(p => p[1]);
    if (Math.max(...xs) - Math.min(...xs) < W * 0.9 && Math.max(...ys) - Math.min(...ys) < H * 0.9) return z;
  }
  return 1;
}
function draw() {
  const all = DATA.database.concat(DATA.photos.map(p => [p.lat, p.lon]));
  const zoom = chooseZoom(all);
  const xy = all.map(p => mercator(p[0], p[1], zoom));
  const cx = (Math.min(...xy.map(p => p[0])) + Math.max(...xy.map(p => p[0]))) / 2;
  const cy = (Math.min(...xy.map(p => p[1])) + Math.max(...xy.map(p => p[1]))) / 2;
  const x0 = cx - W / 2, y0 = cy - H / 2;
  const svg = document.getElementById("map");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const at = (lat, lon) => { const p = mercator(lat, lon, zoom); return [p[0] - x0, p[1] - y0]; };
  if (DATA.basemap_url) {
    const layer = el("g", {id: "basemap"}, svg);
    for (let tx = Math.floor(x0 / TILE); tx <= Math.floor((x0 + W) / TILE); tx++) {
      for (let ty = Math.floor(y0 / TILE); ty <= Math.floor((y0 + H) / TILE); ty++) {
        const url = DATA.basemap_url.replace("{z}", zoom).replace("{x}", tx).replace("{y}", ty);
        el("image", {href: url, x: tx * TILE - x0, y: ty * TILE - y0, width: TILE, height: TILE}, layer);
      }
    }
  }
  const cloud = el("g", {id: "database"}, svg);
  for (const p of DATA.database) { const q = at(p[0], p[1]); el("circle", {cx: q[0], cy: q[1], r: 1.6, class: "db"}, cloud); }
  const mpp = metresPerPixel((DATA.database[0] || [0])[0], zoom);
  const layer = el("g", {id: "estimates"}, svg);
  DATA.photos.forEach((p, i) => {
    const e = at(p.lat, p.lon), c = colour(p.confidence);
    const group = el("g", {class: "photo", "data-index": i}, layer);
    for (const m of p.matches) { const q = at(m.lat, m.lon); el("line", {x1: e[0], y1: e[1], x2: q[0], y2: q[1], stroke: c, class: "topk"}, group); }
    el("circle", {cx: e[0], cy: e[1], r: Math.max(p.radius_m / mpp, 2), stroke: c, class: "uncertainty"}, group);
    const marker = el("circle", {cx: e[0], cy: e[1], r: 5, fill: c, class: "marker", "data-index": i}, group);
    marker.addEventListener("click", () => show(i));
  });
  drawScaleBar(svg, mpp);
  drawNorthArrow(svg);
}
function drawScaleBar(svg, mpp) {
  const target = 150 * mpp, pow = Math.pow(10, Math.floor(Math.log10(target)));
  const metres = [1, 2, 5, 10].map(k => k * pow).filter(m => m <= target).pop();
  const px = metres / mpp, g = el("g", {id: "scalebar", transform: "translate(20," + (H - 25) + ")"}, svg);
  el("rect", {x: 0, y: 0, width: px, height: 6, class: "scale"}, g);
  const label = el("text", {x: 0, y: -4, class: "label"}, g);
  label.textContent = metres >= 1000 ? (metres / 1000) + " km" : metres + " m";
}
function drawNorthArrow(svg) {
  const g = el("g", {id: "north", transform: "translate(" + (W - 35) + ",20)"}, svg);
  el("path", {d: "M0,30 L10,0 L20,30 L10,22 Z", class: "arrow"}, g);
  const t = el("text", {x: 5, y: 45, class: "label"}, g);
  t.textContent = "N";
}
function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
function show(i) {
  const p = DATA.photos[i], panel = document.getElementById("detail");
  document.querySelectorAll(".marker.selected").forEach(m => m.classList.remove("selected"));
  document.querySelector('.marker[data-index="' + i + '"]').classList.add("selected");
  let html = "<h3>" + escapeHtml(p.photo) + "</h3>";
  if (p.thumbnail) {
    html += '<div class="thumb"><img src="' + p.thumbnail + '" alt="photo">';
    if (p.overlay) html += '<img class="overlay" src="' + p.overlay + '" alt="attention">';
    html += "</div>";
  }
  html += "<p>confidence " + (p.confidence === null ? "uncalibrated" : fmt(p.confidence, 3)) + " (within " +
    p.confidence_radius_m + " m); uncertainty radius " + fmt(p.radius_m, 1) + " m; attention " + p.attention + "</p>";
  if (p.claimed) html += "<p>EXIF claims " + fmt(p.claimed[0], 6) + ", " + fmt(p.claimed[1], 6) + " (" + fmt(p.claimed_distance_m, 0) + " m away)</p>";
  html += "<table><tr><th>rank</th><th>database image</th><th>score</th><th>distance (m)</th></tr>";
  for (const m of p.matches) html += "<tr><td>" + m.rank + "</td><td>" + escapeHtml(m.path) + "</td><td>" + fmt(m.score, 4) + "</td><td>" + fmt(m.distance_m, 1) + "</td></tr>";
  panel.innerHTML = html + "</table>";
}
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
let descending = true;
function fillList() {
  const order = DATA.photos.map((p, i) => i).sort((a, b) => {
    const ca = DATA.photos[a].confidence, cb = DATA.photos[b].confidence;
    const va = ca === null ? -1 : ca, vb = cb === null ? -1 : cb;
    return descending ? vb - va : va - vb;
  });
  const body = document.getElementById("list-body");
  body.innerHTML = "";
  for (const i of order) {
    const p = DATA.photos[i], row = document.createElement("tr");
    row.innerHTML = "<td>" + escapeHtml(p.photo) + "</td><td>" + (p.confidence === null ? "uncalibrated" : fmt(p.confidence, 3)) +
      "</td><td>" + fmt(p.radius_m, 1) + "</td><td>" + fmt(p.lat, 6) + ", " + fmt(p.lon, 6) + "</td>";
    row.addEventListener("click", () => show(i));
    body.appendChild(row);
  }
}
window.addEventListener("error", e => { document.body.setAttribute("data-error", String(e.message)); });
draw();
fillList();
document.getElementById("sort-confidence").addEventListener("click", () => { descending = !descending; fillList(); });
document.body.setAttribute("data-ready", "1");
