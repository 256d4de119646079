// The explorer's only script: expand every collapsed diff, copy the revert SQL. No inline script.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button.expand-all").forEach(function (button) {
    button.addEventListener("click", function () {
      var scope = document.getElementById(button.dataset.target) || document;
      var details = scope.querySelectorAll("details");
      var open = Array.prototype.some.call(details, function (d) { return !d.open; });
      details.forEach(function (d) { d.open = open; });
      button.textContent = open ? "Collapse all" : "Expand all";
    });
  });
  document.querySelectorAll("button.copy").forEach(function (button) {
    button.addEventListener("click", function () {
      var text = document.getElementById(button.dataset.target).textContent;
      navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
    });
  });
});
