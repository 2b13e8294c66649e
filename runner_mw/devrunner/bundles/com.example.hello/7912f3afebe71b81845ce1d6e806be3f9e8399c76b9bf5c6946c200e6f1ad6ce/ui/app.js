// Sample extension UI of the runner_mw devrunner.
//
// This page runs in <iframe sandbox="allow-scripts">: an opaque origin that cannot call
// /v1/execute itself. It asks the host page instead (protocol: runner_mw.devrunner's docstring):
//   to the host:   {type: "runner_mw.execute", id, http: {method, path, body}}
//   from the host: {type: "runner_mw.result", id, status, body}
// It loads with relative URLs and needs no ?tenant= of its own: the runner remembers the
// tenant of index.html for the bundle's other files, as the reference runner does.
(function () {
  "use strict";

  var answer = document.getElementById("answer");
  var input = document.getElementById("text");
  var button = document.getElementById("ask");
  var pending = {};
  var counter = 0;
  var TIMEOUT_MS = 15000;

  function show(text) {
    answer.textContent = text; // never innerHTML: the body is the extension's text
  }

  function ask(text) {
    if (window.parent === window) {
      show("Open this page through the host app: it relays calls to the extension.");
      return;
    }
    counter += 1;
    var id = "hello-" + counter + "-" + Math.random().toString(36).slice(2);
    pending[id] = window.setTimeout(function () {
      delete pending[id];
      show("The host app did not answer.");
    }, TIMEOUT_MS);
    show("Asking the extension...");
    // "*": an opaque-origin page cannot name the host's origin; the message carries no secret.
    window.parent.postMessage(
      {type: "runner_mw.execute", id: id, http: {method: "POST", path: "/hello", body: text}},
      "*"
    );
  }

  window.addEventListener("message", function (event) {
    // Only the host page answers, and only calls this page made.
    if (event.source !== window.parent) return;
    var msg = event.data;
    if (!msg || msg.type !== "runner_mw.result") return;
    if (!Object.prototype.hasOwnProperty.call(pending, msg.id)) return;
    window.clearTimeout(pending[msg.id]);
    delete pending[msg.id];
    if (msg.status !== 200) {
      show("Extension error: status " + msg.status);
      return;
    }
    var echo;
    try {
      echo = JSON.parse(msg.body);
    } catch (e) {
      show("Extension says: " + msg.body);
      return;
    }
    show("Extension says: " + echo.body + " (tenant " + echo.tenant + ", path " + echo.path + ")");
  });

  button.addEventListener("click", function () {
    ask(input.value);
  });
  ask(input.value);
})();
