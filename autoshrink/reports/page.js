(function () {
  "use strict";
  function select(trial) {
    var card = document.querySelector("#trial-" + trial + " .trial-card");
    var panel = document.getElementById("selected-trial");
    if (!card || !panel) { return; }
    panel.replaceChildren(card.cloneNode(true));
    document.querySelectorAll(".selected").forEach(function (node) {
      node.classList.remove("selected");
    });
    document.querySelectorAll('[data-trial="' + trial + '"]').forEach(function (node) {
      node.classList.add("selected");
    });
  }
  function openRow(trial) {
    var details = document.querySelector("#trial-" + trial + " details");
    if (details) { details.open = true; }
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a.trial-link");
    if (!link) { return; }
    var trial = link.getAttribute("data-trial");
    select(trial);
    // In the plot the panel beside it shows the plan; elsewhere jump to the trial's row.
    if (link.closest(".pareto")) { event.preventDefault(); } else { openRow(trial); }
  });
  var match = /^#trial-(\\d+)$/.exec(window.location.hash);
  if (match) { openRow(match[1]); }
})();
