// The live log: each entry event (docs/mqtt.md's JSON) becomes the table's first row.
// Text only (textContent), never markup: a name can hold nothing that runs.
"use strict";
(function () {
  const table = document.getElementById("live");
  if (!table || !window.EventSource) return;
  const body = table.tBodies[0];
  const state = document.getElementById("livestate");
  const source = new EventSource("/events");
  // The word comes from the page (the language file), not from this script.
  source.onopen = function () { if (state) state.textContent = state.dataset.live || ""; };
  source.onerror = function () { if (state) state.textContent = ""; };
  source.addEventListener("entry", function (message) {
    const e = JSON.parse(message.data);
    const row = document.createElement("tr");
    row.className = "s-" + e.status;
    const time = (e.time || "").replace("T", " ").slice(0, 19);
    const cells = [time, e.gate || "", e.status + " " + (e.reason || ""),
                   e.credential || "", e.caller || "", e.source || ""];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    const none = body.querySelector("tr.none");
    if (none) none.remove();
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > 50) body.deleteRow(body.rows.length - 1);
  });
})();
