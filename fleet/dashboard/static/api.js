// The fleet API as the dashboard uses it: every call carries the bearer token kept in this
// tab's sessionStorage (never a cookie), and a failed call throws an ApiError with the API's
// stable {"error": {"code", "message"}}.

const KEY = "edge-fleet.token";
// ../api/v1 from /dashboard/: the API of the service that served this page, also behind a
// proxy that mounts the service under a prefix.
const BASE = new URL("../api/v1", document.baseURI);

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// GET by default; `params` become the query string (null and undefined left out); `body`
// is sent as JSON. Resolves to the decoded JSON document.
export async function api(path, { method = "GET", params = {}, body } = {}) {
  const url = new URL(BASE.href + path);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, String(value));
  }
  const headers = { Accept: "application/json", Authorization: `Bearer ${token.get() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
  } catch (err) {
    throw new ApiError(0, "unreachable", `the fleet service does not answer (${err.message})`);
  }
  let doc = null;
  try {
    doc = await response.json();
  } catch {
    doc = null;
  }
  if (!response.ok) {
    const error = doc && typeof doc.error === "object" && doc.error ? doc.error : {};
    throw new ApiError(
      response.status,
      error.code ?? `http_${response.status}`,
      error.message ?? (response.statusText || "the request failed"),
    );
  }
  return doc;
}
