// The host page's side of the extension UI protocol (runner_mw.devrunner's docstring).
//
// Every <iframe data-runner-extension> on the page is an extension UI in
// sandbox="allow-scripts": an opaque origin, so it cannot call /v1/execute itself. It posts
//   {type: "runner_mw.execute", id, http: {method, path, body}}
// to this page, which calls /v1/execute and answers
//   {type: "runner_mw.result", id, status, body}.
// The tenant, extension and content hash come from the iframe's data-* attributes, which the
// server rendered; the message only supplies the HTTP part (and the server's execute_hook
// binds the tenant to the signed-in user anyway).
(function () {
  "use strict";

  // Framed by another site, this page's extension iframes can be navigated by that site's
  // top page to documents of its own, which would then talk to this bridge as the extension
  // would. Send the page with "Content-Security-Policy: frame-ancestors 'self'"; and relay
  // nothing when framed by another origin all the same.
  function framedByAnotherOrigin() {
    // Every ancestor, not only the top: a page of this origin may embed another site that
    // embeds this page, and that frame may navigate the extension iframes below it too.
    try {
      for (var w = window; w !== window.top; w = w.parent) {
        // window.origin, not location.origin: a srcdoc or about:blank frame of this page's
        // origin has "null" as its location's.
        if (w.parent.origin !== window.origin) return true;
      }
      return false;
    } catch (err) {
      return true;  // reading a cross-origin frame's origin throws
    }
  }
  if (framedByAnotherOrigin()) {
    console.warn("runner-bridge: framed by another origin; extension calls are not relayed");
    return;
  }

  function toBase64(text) {
    var bytes = new TextEncoder().encode(text), binary = "";
    for (var i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary);
  }

  function fromBase64(b64) {
    var binary = atob(b64), bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return new TextDecoder().decode(bytes);
  }

  function frameOf(source) {
    var frames = document.querySelectorAll("iframe[data-runner-extension]");
    for (var i = 0; i < frames.length; i++) {
      if (source !== null && frames[i].contentWindow === source) return frames[i];
    }
    return null;
  }

  async function execute(frame, http) {
    var d = frame.dataset;
    var envelope = {
      context: {tenant_id: d.tenant, extension_id: d.runnerExtension, content_hash: d.contentHash},
      http: {
        method: String(http.method || "GET"),
        path: String(http.path || "/"),
        body_b64: typeof http.body === "string" ? toBase64(http.body) : null
      }
    };
    try {
      var response = await fetch(d.executeUrl, {
        method: "POST",
        headers: {"Content-Type": "application/json"},  // /v1/execute requires it
        body: JSON.stringify(envelope)
      });
      var text = await response.text();
      if (!response.ok) return {status: response.status, body: text};  // a gateway error (JSON)
      var reply = JSON.parse(text);  // the runner's envelope: {status, headers, body_b64, error}
      return {status: reply.status, body: reply.body_b64 ? fromBase64(reply.body_b64) : ""};
    } catch (err) {
      return {status: 502, body: String(err)};
    }
  }

  window.addEventListener("message", async function (event) {
    var frame = frameOf(event.source);  // only our extension frames, never another window
    var msg = event.data;
    if (!frame || !msg || msg.type !== "runner_mw.execute" || typeof msg.id !== "string") return;
    var result = await execute(frame, msg.http || {});
    // "*": a sandboxed frame's origin is "null"; the target is that very frame's window.
    frame.contentWindow.postMessage(
      {type: "runner_mw.result", id: msg.id, status: result.status, body: result.body}, "*"
    );
  });
})();
