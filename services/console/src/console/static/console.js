// Small behaviours of the console pages; everything works without them except the copy
// button and the confirm prompts (the server asks again for Reboot and Force OTA anyway).
(function () {
  "use strict";

  // Forms with data-confirm ask before they submit.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        event.stopImmediatePropagation();
      }
    }
  }, true);

  // A new search or filter starts again from the first page.
  function resetCursor(event) {
    var form = event.target && event.target.form;
    if (!form) { return; }
    form.querySelectorAll("[data-reset-on-filter]").forEach(function (input) { input.value = ""; });
  }
  document.addEventListener("input", resetCursor, true);
  document.addEventListener("change", resetCursor, true);

  // Copy buttons: data-copy names the input whose value is copied.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) { return; }
    var input = document.querySelector(button.dataset.copy);
    var status = button.parentElement.querySelector("[data-copy-status]");
    if (!input) { return; }
    input.select();
    function done(message) { if (status) { status.textContent = message; } }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(
        function () { done("Copied."); },
        function () { done("Select the secret and copy it (Ctrl+C)."); });
    } else {
      try {
        done(document.execCommand("copy") ? "Copied." : "Select the secret and copy it (Ctrl+C).");
      } catch (e) {
        done("Select the secret and copy it (Ctrl+C).");
      }
    }
  });
})();
