// The API reference at /docs: Swagger UI (vendored beside this file) rendering this server's /openapi.json.
// No inline script: the page's Content-Security-Policy allows scripts from this server only.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null, // never send the document to an outside validator
    tryItOutEnabled: false,
    persistAuthorization: false,
  });
});
