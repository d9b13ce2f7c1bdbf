// Fleet Map: GPS devices as green and red circle markers (drawn as SVG, so they show even
// when no tile server is configured or reachable), refreshed periodically.
(function () {
  "use strict";
  var el = document.getElementById("map");
  var statusEl = document.getElementById("map-status");
  if (!el || typeof L === "undefined") {
    if (statusEl) { statusEl.textContent = "The map library did not load."; }
    return;
  }
  var map = L.map(el, { worldCopyJump: true }).setView([20, 0], 2);
  if (el.dataset.tileUrl) {
    L.tileLayer(el.dataset.tileUrl, {
      maxZoom: 19, attribution: el.dataset.tileAttribution || ""
    }).addTo(map);
  }
  var layer = L.layerGroup().addTo(map);
  var fitted = false;

  function text(value) {
    var span = document.createElement("span");
    span.textContent = value == null ? "" : String(value);
    return span.innerHTML;
  }

  function ago(iso) {
    if (!iso) { return "never"; }
    var s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 60) { return s + " s ago"; }
    if (s < 3600) { return Math.floor(s / 60) + " min ago"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h ago"; }
    return Math.floor(s / 86400) + " d ago";
  }

  function popup(p) {
    return "<strong>" + text(p.name) + "</strong><br><code>" + text(p.id) + "</code><br>" +
      text(p.connection) + (p.marker === "red" ? " · needs attention or lost contact" : "") +
      "<br>Last seen " + text(ago(p.last_seen_at)) +
      (p.last_seen_at ? " (" + text(p.last_seen_at) + ")" : "") +
      '<br><a href="/devices/' + encodeURIComponent(p.id) + '">Manage</a>';
  }

  function draw(collection) {
    layer.clearLayers();
    var bounds = [];
    var counts = { green: 0, red: 0 };
    (collection.features || []).forEach(function (f) {
      if (!f.geometry || !f.geometry.coordinates) { return; }
      var p = f.properties || {};
      var colour = p.marker === "green" ? "green" : "red";
      counts[colour] += 1;
      var latlng = [f.geometry.coordinates[1], f.geometry.coordinates[0]];
      bounds.push(latlng);
      L.circleMarker(latlng, {
        radius: 9, weight: 2, fillOpacity: 0.85,
        color: colour === "green" ? "#1b7f3b" : "#b3261e",
        fillColor: colour === "green" ? "#2fb35a" : "#e5484d",
        className: "marker marker-" + colour
      }).bindPopup(popup(p)).bindTooltip(text(p.name)).addTo(layer);
    });
    if (!fitted && bounds.length) {
      map.fitBounds(bounds, { padding: [30, 30], maxZoom: 12 });
      fitted = true;
    }
    statusEl.textContent = bounds.length
      ? bounds.length + " GPS devices: " + counts.green + " green, " + counts.red + " red."
      : "No GPS devices in your fleet.";
  }

  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

  // Until the first fit, the whole world; afterwards what the map shows (pans reload).
  function bbox() {
    if (!fitted) { return "-180,-90,180,90"; }
    var b = map.getBounds();
    return [clamp(b.getWest(), -180, 180), clamp(b.getSouth(), -90, 90),
            clamp(b.getEast(), -180, 180), clamp(b.getNorth(), -90, 90)]
      .map(function (v) { return v.toFixed(5); }).join(",");
  }

  function load() {
    fetch(el.dataset.source + "?bbox=" + encodeURIComponent(bbox()), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401 || r.redirected) { window.location = "/login?next=/map"; return null; }
        return r.json().then(function (body) {
          if (!r.ok) { throw new Error(body.error || ("HTTP " + r.status)); }
          return body;
        });
      })
      .then(function (body) { if (body) { draw(body); } })
      .catch(function (err) { statusEl.textContent = "Could not load devices: " + err.message; });
  }
  load();
  map.on("moveend", function () { if (fitted) { load(); } });
  setInterval(load, parseInt(el.dataset.refreshMs, 10) || 9000);
})();
