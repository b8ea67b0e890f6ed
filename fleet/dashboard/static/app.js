// The fleet dashboard: one page, hash routes (#/ the fleet, #/rollouts/ID, #/devices/ID),
// every figure read from the bearer-token API (api.js). This module routes and asks for
// the token; the pages are summary.js, rollout.js and device.js.

import { token } from "./api.js";
import { devicePage } from "./device.js";
import { rolloutPage } from "./rollout.js";
import { summaryPage } from "./summary.js";
import { errorText, h, hideError, main, nextGeneration, page, setCrumbs, signOutOn401 } from "./view.js";

const forget = document.getElementById("forget");

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "rollouts" && parts[1]) return { show: rolloutPage, id: parts[1], params };
  if (parts[0] === "devices" && parts[1]) return { show: devicePage, id: parts[1], params };
  return { show: summaryPage, id: null, params };
}

async function render() {
  const mine = nextGeneration();
  hideError();
  if (!token.get()) {
    showTokenForm(null);
    return;
  }
  forget.hidden = false;
  const { show, id, params } = route();
  try {
    const view = await show(id, params);
    if (mine === page.generation) main.replaceChildren(view);
  } catch (err) {
    if (mine === page.generation && !signOutOn401(err)) {
      main.replaceChildren(h("p", { class: "error page-error", role: "alert" }, errorText(err)));
    }
  }
}

// The token form (index.html's template): `err`, the API's refusal of the last token.
function showTokenForm(err) {
  nextGeneration();
  hideError();
  forget.hidden = true;
  setCrumbs();
  const form = document.getElementById("token-form").content.firstElementChild.cloneNode(true);
  const message = form.querySelector("[data-role=message]");
  if (err) {
    message.textContent = errorText(err);
    message.hidden = false;
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = form.elements.token.value.trim();
    if (!value) return;
    token.set(value);
    render();
  });
  main.replaceChildren(form);
  form.elements.token.focus();
}

page.rerender = render;
page.onUnauthorized = (err) => {
  token.clear();
  showTokenForm(err);
};
forget.addEventListener("click", () => {
  token.clear();
  showTokenForm(null);
});
document.getElementById("refresh").addEventListener("click", () => render());
window.addEventListener("hashchange", render);
render();
