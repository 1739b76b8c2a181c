// WebRTC helpers: ICE configuration from the URL, a fully gathered offer (non-trickle), and inbound video stats.

/**
 * ICE servers for RTCPeerConnection. Empty by default (the server and the browser are expected to reach each
 * other directly); `?ice=stun:host:3478,turn:host` adds URLs, `?iceServers=<JSON list>` gives full entries
 * (TURN credentials included).
 */
export function iceServersFromUrl(search = window.location.search) {
  const query = new URLSearchParams(search);
  const json = query.get('iceServers');
  if (json) {
    const servers = JSON.parse(json); // a malformed value throws; the caller reports it
    if (!Array.isArray(servers)) throw new Error('iceServers must be a JSON list');
    return servers;
  }
  const urls = (query.get('ice') ?? '')
    .split(',')
    .map((url) => url.trim())
    .filter(Boolean);
  return urls.length ? [{ urls }] : [];
}

/** Resolve when ICE gathering is complete, or after `timeoutMs` with whatever candidates exist by then. */
function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const finish = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === 'complete') finish();
    };
    const timer = setTimeout(finish, timeoutMs);
    pc.addEventListener('icegatheringstatechange', check);
  });
}

/** Create an offer and return the local description once all candidates are in it (the API has no trickle). */
export async function completeOffer(pc, timeoutMs = 5000) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringDone(pc, timeoutMs);
  return pc.localDescription;
}

/**
 * The incoming (edited) video's stats since the previous call: decode rate, drops and jitter-buffer delay.
 * Returns {summary, raw}; pass `raw` back in as `previous` next time.
 */
export async function inboundVideoStats(pc, previous = null) {
  const report = await pc.getStats();
  let inbound = null;
  report.forEach((entry) => {
    if (entry.type === 'inbound-rtp' && entry.kind === 'video') inbound = entry;
  });
  if (!inbound) return { summary: null, raw: previous };
  const raw = {
    timestamp: inbound.timestamp,
    framesDecoded: inbound.framesDecoded ?? 0,
    framesDropped: inbound.framesDropped ?? 0,
    jitterBufferDelay: inbound.jitterBufferDelay ?? 0,
    jitterBufferEmittedCount: inbound.jitterBufferEmittedCount ?? 0,
  };
  let fps = inbound.framesPerSecond ?? null;
  let jitterMs = null;
  if (previous) {
    const seconds = (raw.timestamp - previous.timestamp) / 1000;
    if (fps === null && seconds > 0) fps = (raw.framesDecoded - previous.framesDecoded) / seconds;
    const emitted = raw.jitterBufferEmittedCount - previous.jitterBufferEmittedCount;
    if (emitted > 0) jitterMs = (1000 * (raw.jitterBufferDelay - previous.jitterBufferDelay)) / emitted;
  }
  return {
    summary: {
      fps,
      framesDecoded: raw.framesDecoded,
      framesDropped: raw.framesDropped,
      jitterMs,
      width: inbound.frameWidth ?? null,
      height: inbound.frameHeight ?? null,
    },
    raw,
  };
}
