// The StreamEdit REST API as small async functions; every failure becomes an ApiError with a readable message.

export class ApiError extends Error {
  /**
   * @param {number} status HTTP status, or 0 when the server could not be reached.
   * @param {string} message What went wrong, fit to show a person.
   * @param {number|null} retryAfter Seconds to wait before trying again (from Retry-After), if given.
   */
  constructor(status, message, retryAfter = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

/** Seconds from a Retry-After header, which is either a number of seconds or an HTTP date. */
function retryAfterSeconds(response) {
  const value = response.headers.get('Retry-After');
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** FastAPI errors carry `detail` as a string or as a list of {loc, msg}; make one sentence of either. */
function describe(status, data) {
  const detail = data?.detail;
  if (typeof detail === 'string') return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        const where = (item.loc ?? []).filter((part) => part !== 'body').join('.');
        return where ? `${where}: ${item.msg}` : item.msg;
      })
      .join('; ');
  }
  return `HTTP ${status}`;
}

const TIMEOUT_MS = 10000;

async function request(method, path, { body, token, keepalive = false } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      keepalive,
      cache: 'no-store',
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
  } catch (error) {
    const late = error.name === 'TimeoutError';
    throw new ApiError(0, late ? `the server did not answer within ${TIMEOUT_MS / 1000} s` : 'the server cannot be reached');
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, describe(response.status, data), retryAfterSeconds(response));
  return data;
}

// Paths are relative so the page also works when the service is mounted under a prefix.
const sessionPath = (id) => `./v1/sessions/${encodeURIComponent(id)}`;

export const api = {
  presets: () => request('GET', './v1/presets'),
  createSession: (offer, edit) =>
    request('POST', './v1/sessions', { body: { sdp: offer.sdp, type: offer.type, edit } }),
  getSession: (id, token) => request('GET', sessionPath(id), { token }),
  patchSession: (id, token, changes) => request('PATCH', sessionPath(id), { body: changes, token }),
  deleteSession: (id, token, { keepalive = false } = {}) => request('DELETE', sessionPath(id), { token, keepalive }),
};
