// The StreamEdit page: camera in, edited stream out, edit parameters PATCHed live, stats shown once a second.

import { api, ApiError } from './api.js';
import { completeOffer, iceServersFromUrl, inboundVideoStats } from './rtc.js';

const $ = (id) => document.getElementById(id);

const ui = {
  status: $('status'),
  messages: $('messages'),
  preview: $('preview'),
  output: $('output'),
  outputPrompt: $('output-prompt'),
  camera: $('camera'),
  start: $('start'),
  stop: $('stop'),
  presets: $('presets'),
  promptForm: $('prompt-form'),
  prompt: $('prompt'),
  reading: $('reading'),
  seedRandom: $('seed-random'),
  stats: $('stats'),
  statEdited: $('stat-edited'),
  statReceived: $('stat-received'),
  statLatency: $('stat-latency'),
  statDropped: $('stat-dropped'),
};

/** Each edit parameter's control: how to read it, and how fast a change goes to the server. */
const PARAMS = {
  text_guidance: { kind: 'range', debounceMs: 150 },
  image_guidance: { kind: 'range', debounceMs: 150 },
  latent_feedback: { kind: 'range', debounceMs: 150 },
  skip_threshold: { kind: 'range', debounceMs: 150 },
  hold_threshold: { kind: 'range', debounceMs: 150 },
  seed: { kind: 'int', debounceMs: 0 },
  max_skipped_frames: { kind: 'int', debounceMs: 0 },
  fixed_noise: { kind: 'bool', debounceMs: 0 },
  similarity_skip: { kind: 'bool', debounceMs: 0 },
  hold_still: { kind: 'bool', debounceMs: 0 },
};

const CONNECT_TIMEOUT_MS = 15000;
const POLL_MS = 1000;

const state = {
  run: 0, // bumped by every start/stop, so a slow start can tell it was cancelled
  phase: 'idle', // idle | starting | live
  stream: null,
  pc: null,
  session: null, // {id, token}
  touched: new Set(), // params the person changed; sent with the session offer
  effective: {}, // the server's last word on the session's params
  poller: null,
  connectTimer: null,
  lastInbound: null,
  // What the server asks of the camera (GET /v1/presets: camera); these stand in until it answers.
  camera: { height: 480, frame_rate: 30, max_kbps: 1000 },
};

// ---------------------------------------------------------------------------------------------------------------
// Messages and status

/**
 * Show (or update) the message box `key`. `text` is a string, or a function of the seconds left when
 * `countdown` is given: the box then counts down once a second.
 */
function showMessage(kind, text, { key = kind, countdown = null } = {}) {
  let box = ui.messages.querySelector(`[data-key="${key}"]`);
  if (!box) {
    box = document.createElement('div');
    box.dataset.key = key;
    box.innerHTML = '<p></p><button type="button" class="dismiss" aria-label="Dismiss message">×</button>';
    box.querySelector('button').addEventListener('click', () => clearMessage(key));
    ui.messages.append(box);
  }
  box.className = `message ${kind}`;
  box.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  const line = box.querySelector('p');
  clearInterval(box.timer);
  if (countdown === null) {
    line.textContent = text;
    return;
  }
  const ends = Date.now() + countdown * 1000;
  const tick = () => {
    const left = Math.max(0, Math.ceil((ends - Date.now()) / 1000));
    line.textContent = text(left);
    if (left === 0) clearInterval(box.timer);
  };
  tick();
  box.timer = setInterval(tick, 1000);
}

function clearMessage(key) {
  const box = ui.messages.querySelector(`[data-key="${key}"]`);
  if (box) {
    clearInterval(box.timer);
    box.remove();
  }
}

function setStatus(stateName, text) {
  ui.status.dataset.state = stateName;
  ui.status.textContent = text;
}

function setPhase(phase) {
  state.phase = phase;
  ui.start.disabled = phase !== 'idle';
  ui.stop.disabled = phase === 'idle' || phase === 'stopping';
  ui.start.textContent = phase === 'starting' ? 'Starting…' : 'Start';
  ui.stats.hidden = phase !== 'live';
  document.body.dataset.phase = phase;
  if (phase === 'idle') setStatus('idle', 'Idle');
  if (phase === 'starting') setStatus('busy', 'Connecting…');
  if (phase === 'stopping') setStatus('busy', 'Stopping…');
}

// ---------------------------------------------------------------------------------------------------------------
// Parameters: controls ⇄ state ⇄ PATCH

function readControl(name) {
  const input = $(name);
  const { kind } = PARAMS[name];
  if (kind === 'bool') return input.checked;
  if (kind === 'int') return Number.parseInt(input.value, 10);
  return Number(input.value);
}

function showValue(name) {
  const out = $(`${name}-value`);
  if (out) out.textContent = String($(name).value);
}

function writeControl(name, value) {
  const input = $(name);
  if (PARAMS[name].kind === 'bool') input.checked = Boolean(value);
  else input.value = String(value);
  showValue(name);
}

function markPreset(prompt) {
  for (const button of ui.presets.querySelectorAll('button')) {
    button.setAttribute('aria-pressed', String(button.dataset.prompt === prompt));
  }
  ui.outputPrompt.textContent = state.session && prompt ? `· “${prompt}”` : '';
}

/** Below 0.6 for its heaviest edit, a reading is a blend the model was not sure of: say so. */
const UNSURE_SHARE = 0.6;

/** How the server read the instruction: the trained edits it became, heaviest first (null: not read). */
function showReading(reading) {
  ui.reading.hidden = !Array.isArray(reading);
  ui.reading.classList.remove('unsure');
  if (!Array.isArray(reading)) return;
  if (reading.length === 0) {
    ui.reading.textContent = 'Read as: no edit.';
    return;
  }
  const parts = reading.map(({ edit, share }) => `${edit.replaceAll('_', ' ')} ${Math.round(share * 100)} %`);
  ui.reading.textContent = `Read as: ${parts.join(' · ')}.`;
  if (reading[0].share < UNSURE_SHARE) {
    ui.reading.classList.add('unsure');
    ui.reading.textContent += ' Not sure what you meant: try other words, or a preset.';
  }
}

/** Show the server's effective params, except fields with a change of ours still on its way. */
function applyEffective(edit) {
  state.effective = { ...edit };
  for (const [name, value] of Object.entries(edit)) {
    if (patcher.has(name)) continue;
    if (name === 'prompt') {
      if (document.activeElement !== ui.prompt) ui.prompt.value = value;
    } else if (name in PARAMS && document.activeElement !== $(name)) {
      writeControl(name, value);
    }
  }
  markPreset(edit.prompt);
}

/** Collects changes, waits out the debounce, and keeps one PATCH in flight at a time. */
const patcher = {
  pending: {},
  timer: null,
  inFlight: false,
  has(name) {
    return name in this.pending;
  },
  queue(changes, delayMs) {
    Object.assign(this.pending, changes);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.flush(), delayMs);
  },
  reset() {
    clearTimeout(this.timer);
    this.pending = {};
  },
  async flush() {
    const session = state.session;
    if (this.inFlight || !session || Object.keys(this.pending).length === 0) return;
    const changes = this.pending;
    this.pending = {};
    this.inFlight = true;
    try {
      const result = await api.patchSession(session.id, session.token, changes);
      if (state.session === session) {
        applyEffective(result.edit);
        if ('prompt' in changes) showReading(result.reading);
        clearMessage('param');
      }
    } catch (error) {
      if (state.session === session && (error.status === 429 || error.status === 503)) {
        // Over the session's PATCH rate, or the server's prompt encoder is busy: nothing was applied. Send these
        // changes again (under any made since) when the server says.
        this.inFlight = false;
        this.queue({ ...changes, ...this.pending }, 1000 * (error.retryAfter || 1));
        return;
      }
      if (state.session === session) await patchFailed(error);
    } finally {
      this.inFlight = false;
    }
    if (Object.keys(this.pending).length) this.flush();
  },
};

async function patchFailed(error) {
  if (error.status === 422 || error.status === 400) {
    showMessage('warning', `That setting was not accepted: ${error.message}`, { key: 'param' });
    applyEffective(state.effective); // put the controls back to what the session really uses
  } else if (error.status === 401 || error.status === 403 || error.status === 404) {
    await stop({ reason: 'The server has ended this session. Press Start to begin a new one.' });
  } else {
    showMessage('error', `Could not change the setting (${describeFailure(error)}).`, { key: 'param' });
  }
}

function changeParam(name, value, debounceMs) {
  state.touched.add(name);
  if (state.session) patcher.queue({ [name]: value }, debounceMs);
}

function paramsForNewSession() {
  const edit = {};
  for (const name of state.touched) edit[name] = name === 'prompt' ? ui.prompt.value.trim() : readControl(name);
  return edit;
}

function wireControls() {
  for (const [name, { kind, debounceMs }] of Object.entries(PARAMS)) {
    const input = $(name);
    const eventName = kind === 'range' ? 'input' : 'change';
    input.addEventListener(eventName, () => {
      showValue(name);
      if (kind === 'int' && !input.checkValidity()) {
        showMessage('warning', `${input.labels[0].textContent} must be a whole number from ${input.min} to ${input.max}.`, {
          key: 'param',
        });
        return;
      }
      clearMessage('param');
      changeParam(name, readControl(name), debounceMs);
    });
    showValue(name);
  }
  ui.seedRandom.addEventListener('click', () => {
    writeControl('seed', Math.floor(Math.random() * 2 ** 31));
    changeParam('seed', readControl('seed'), 0);
  });
  ui.promptForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const prompt = ui.prompt.value.trim();
    if (!prompt) return;
    choosePrompt(prompt);
  });
}

function choosePrompt(prompt) {
  ui.prompt.value = prompt;
  markPreset(prompt);
  changeParam('prompt', prompt, 0);
}

/** A 1, 2 or 5 × 10^k step that cuts `span` into roughly 20–50 steps (finer if needed) and divides `low`.
 *  A range input snaps to min + k·step, so a step that does not divide min would move round
 *  values (the model's defaults, e.g. 1.0 on a 0.75–1.5 slider, became 1.01). */
function niceStep(low, span) {
  const rough = span / 50;
  let power = 10 ** Math.floor(Math.log10(rough));
  for (let tries = 0; tries < 6; tries += 1, power /= 10) {
    const step = [5, 2, 1].map((m) => Number((m * power).toPrecision(1))).find(
      (candidate) => candidate <= rough * 2.5 && Math.abs(low / candidate - Math.round(low / candidate)) < 1e-6,
    );
    if (step) return step;
  }
  return Number(power.toPrecision(1));
}

/** Fit a guidance slider to the range the model was trained on (the API accepts more; beyond it edits extrapolate). */
function fitSlider(name, [low, high]) {
  const input = $(name);
  if (!input || !(high > low)) return;
  const value = input.value;
  Object.assign(input, { min: String(low), max: String(high), step: String(niceStep(low, high - low)) });
  input.value = value; // re-clamped to the new range and step
  showValue(name);
}

function renderPresets(presets) {
  ui.presets.replaceChildren(
    ...presets.map((preset) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'preset';
      button.textContent = preset.name;
      button.title = preset.prompt;
      button.dataset.prompt = preset.prompt;
      button.setAttribute('aria-pressed', 'false');
      button.addEventListener('click', () => choosePrompt(preset.prompt));
      return button;
    }),
  );
}

/** The model's presets, the params a session starts with, and its trained guidance ranges (GET /v1/presets). */
async function loadModelInfo() {
  let info;
  try {
    info = await api.presets();
  } catch (error) {
    const text = `Preset instructions are unavailable (${describeFailure(error)}); free text still works.`;
    showMessage('warning', text, { key: 'presets' });
    return;
  }
  renderPresets(info.presets ?? []);
  if (info.camera) state.camera = info.camera;
  for (const [name, range] of Object.entries(info.ranges ?? {})) fitSlider(name, range);
  if (info.defaults && !state.session) {
    // Show what a new session will start with, except what the person already changed.
    const untouched = Object.entries(info.defaults).filter(([name]) => !state.touched.has(name));
    applyEffective(Object.fromEntries(untouched));
  }
  markPreset(ui.prompt.value);
}

// ---------------------------------------------------------------------------------------------------------------
// Camera

async function openCamera(deviceId) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw Object.assign(new Error('no mediaDevices'), { name: 'InsecureContext' });
  }
  return navigator.mediaDevices.getUserMedia({
    audio: false,
    video: {
      deviceId: deviceId ? { exact: deviceId } : undefined,
      // No larger or faster than the editor takes: the rest would only be encoded, sent, decoded and dropped.
      height: { ideal: Math.max(state.camera.height, 240) },
      frameRate: { ideal: state.camera.frame_rate },
    },
  });
}

function cameraProblem(error) {
  switch (error.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'Camera access was denied. Allow the camera for this site (address bar → site settings), then press Start.';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'No camera was found. Connect a camera, then press Start.';
    case 'NotReadableError':
    case 'AbortError':
      return 'The camera could not be started; another application may be using it.';
    case 'InsecureContext':
      return 'Browsers only allow the camera on https:// pages or on http://localhost; open the page that way.';
    default:
      return `The camera could not be opened (${error.message || error.name}).`;
  }
}

/** Fill the camera picker; device names are only known once camera permission was given. */
async function refreshCameras() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === 'videoinput');
  const activeId = state.stream?.getVideoTracks()[0]?.getSettings().deviceId;
  const selected = activeId || ui.camera.value;
  const options = devices
    .filter((d) => d.deviceId)
    .map((d, index) => new Option(d.label || `Camera ${index + 1}`, d.deviceId));
  if (options.length === 0) options.push(new Option('Default camera', ''));
  ui.camera.replaceChildren(...options);
  if (options.some((o) => o.value === selected)) ui.camera.value = selected;
}

/** Swap the camera of a running session in place: the sender gets the new track, no renegotiation. */
async function switchCamera() {
  if (state.phase !== 'live') return;
  const run = state.run;
  let stream;
  try {
    stream = await openCamera(ui.camera.value);
  } catch (error) {
    showMessage('error', cameraProblem(error), { key: 'camera' });
    return;
  }
  if (run !== state.run) {
    stream.getTracks().forEach((t) => t.stop());
    return;
  }
  const sender = state.pc.getSenders().find((s) => s.track?.kind === 'video');
  await sender?.replaceTrack(stream.getVideoTracks()[0]);
  state.stream.getTracks().forEach((t) => t.stop());
  state.stream = stream;
  ui.preview.srcObject = stream;
  clearMessage('camera');
  fitSendSize();
}

/** Send no more than the editor uses: scale the outgoing video down to about the output's size, and cap its
 * frame rate and bitrate at what the server asks for (GET /v1/presets: camera). */
async function fitSendSize() {
  const sender = state.pc?.getSenders().find((s) => s.track?.kind === 'video');
  const side = Math.min(ui.output.videoWidth, ui.output.videoHeight);
  const settings = sender?.track?.getSettings();
  if (!sender || !side || !settings?.width || !settings?.height) return;
  const scale = Math.max(1, Math.min(settings.width, settings.height) / side);
  const parameters = sender.getParameters();
  const encoding = parameters.encodings?.[0];
  if (!encoding) return;
  const wanted = {
    scaleResolutionDownBy: scale,
    maxFramerate: state.camera.frame_rate,
    maxBitrate: state.camera.max_kbps * 1000,
  };
  if (Object.entries(wanted).every(([key, value]) => encoding[key] === value)) return;
  Object.assign(encoding, wanted);
  await sender.setParameters(parameters).catch(() => {}); // an optimisation only; the stream works without it
}

// ---------------------------------------------------------------------------------------------------------------
// Session lifecycle

function describeFailure(error) {
  if (!(error instanceof ApiError)) return error.message || String(error);
  if (error.status === 0) return error.message;
  return `${error.status}: ${error.message}`;
}

async function start() {
  if (state.phase !== 'idle') return;
  const run = ++state.run;
  setPhase('starting');
  for (const key of ['session', 'camera', 'connection', 'full']) clearMessage(key);

  let stream;
  try {
    stream = await openCamera(ui.camera.value);
  } catch (error) {
    if (run !== state.run) return;
    setPhase('idle');
    showMessage('error', cameraProblem(error), { key: 'camera' });
    return;
  }
  if (run !== state.run) {
    stream.getTracks().forEach((t) => t.stop());
    return;
  }
  state.stream = stream;
  ui.preview.srcObject = stream;
  refreshCameras().catch(() => {});

  let iceServers = [];
  try {
    iceServers = iceServersFromUrl();
  } catch (error) {
    showMessage('warning', `Ignoring the iceServers in the address (${error.message}).`, { key: 'ice' });
  }
  const pc = new RTCPeerConnection({ iceServers });
  state.pc = pc;
  pc.addTrack(stream.getVideoTracks()[0], stream);
  pc.addEventListener('track', (event) => {
    ui.output.srcObject = event.streams[0] ?? new MediaStream([event.track]);
  });
  pc.addEventListener('connectionstatechange', () => connectionChanged(pc, run));

  let answer;
  try {
    const offer = await completeOffer(pc);
    if (run !== state.run) return;
    answer = await api.createSession(offer, paramsForNewSession());
  } catch (error) {
    if (run !== state.run) return;
    await stop();
    sessionRefused(error);
    return;
  }
  if (run !== state.run) {
    // Stopped while the server was answering: let it go at once rather than waiting for the reaper.
    api.deleteSession(answer.session_id, answer.token).catch(() => {});
    return;
  }
  state.session = { id: answer.session_id, token: answer.token };
  try {
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  } catch (error) {
    if (run !== state.run) return;
    await stop();
    showMessage('error', `The server's answer could not be used (${error.message}).`, { key: 'connection' });
    return;
  }
  applyEffective(answer.edit);
  state.connectTimer = setTimeout(() => {
    if (run === state.run && pc.connectionState !== 'connected') connectionFailed(run);
  }, CONNECT_TIMEOUT_MS);
  state.poller = setInterval(() => pollStats(run), POLL_MS);
}

function sessionRefused(error) {
  if (error instanceof ApiError && error.status === 503) {
    const full = 'The server is full right now.';
    if (error.retryAfter === null) {
      showMessage('warning', `${full} Try again in a little while.`, { key: 'full' });
    } else {
      const text = (left) => (left > 0 ? `${full} Try again in ${left} s.` : `${full} Try again now.`);
      showMessage('warning', text, { key: 'full', countdown: error.retryAfter });
    }
  } else if (error instanceof ApiError && (error.status === 400 || error.status === 422)) {
    showMessage('error', `The server did not accept the session: ${error.message}`, { key: 'session' });
  } else if (error instanceof ApiError) {
    showMessage('error', `Server error: ${describeFailure(error)}. Try again shortly.`, { key: 'session' });
  } else {
    showMessage('error', `Could not set up the connection (${describeFailure(error)}).`, { key: 'connection' });
  }
}

function connectionChanged(pc, run) {
  if (run !== state.run) return;
  switch (pc.connectionState) {
    case 'connected':
      clearTimeout(state.connectTimer);
      clearMessage('connection');
      setPhase('live');
      setStatus('live', 'Live');
      break;
    case 'disconnected':
      setStatus('busy', 'Reconnecting…');
      showMessage('warning', 'The connection to the server was interrupted; trying to recover…', {
        key: 'connection',
      });
      break;
    case 'failed':
      connectionFailed(run);
      break;
    default:
      break;
  }
}

async function connectionFailed(run) {
  if (run !== state.run) return;
  await stop();
  showMessage(
    'error',
    'Connection failed: no network path to the server for the video. ' +
      'Behind a firewall or NAT, the server needs a TURN server (open the page with ?ice=turn:… or ?iceServers=[…]).',
    { key: 'connection' },
  );
}

async function stop({ reason = null } = {}) {
  const { pc, stream, session } = state;
  state.run += 1;
  state.pc = null;
  state.stream = null;
  state.session = null;
  state.lastInbound = null;
  clearInterval(state.poller);
  clearTimeout(state.connectTimer);
  patcher.reset();
  stream?.getTracks().forEach((t) => t.stop());
  ui.preview.srcObject = null;
  ui.output.srcObject = null;
  ui.outputPrompt.textContent = '';
  showReading(null);
  clearMessage('connection');
  if (reason) showMessage('warning', reason, { key: 'session' });
  if (session) {
    // End the session before closing the connection: the server then frees it on our word, not by noticing
    // the peer went away, and a new Start is not refused while the old session still holds its slot.
    setPhase('stopping');
    try {
      await api.deleteSession(session.id, session.token);
    } catch (error) {
      if (error.status !== 404) {
        const text = `The server did not confirm the end of the session (${describeFailure(error)}).`;
        showMessage('warning', text, { key: 'session' });
      }
    }
  }
  pc?.close();
  setPhase('idle');
}

/** On leaving the page, end the session; keepalive lets the request outlive the page. */
function endOnUnload() {
  const { session } = state;
  if (!session) return;
  state.session = null;
  api.deleteSession(session.id, session.token, { keepalive: true }).catch(() => {});
}

// ---------------------------------------------------------------------------------------------------------------
// Stats

const fmt = (value, digits = 0) => (value === null || value === undefined || Number.isNaN(value) ? '–' : value.toFixed(digits));

async function pollStats(run) {
  const { pc, session } = state;
  if (run !== state.run || !pc || !session) return;
  const [browser, server] = await Promise.allSettled([inboundVideoStats(pc, state.lastInbound), api.getSession(session.id, session.token)]);
  if (run !== state.run) return;

  let inbound = null;
  if (browser.status === 'fulfilled') {
    state.lastInbound = browser.value.raw;
    inbound = browser.value.summary;
  }
  let stats = null;
  if (server.status === 'fulfilled') {
    stats = server.value.stats;
    // A reading polled while a new prompt is on its way would be the old prompt's.
    if (!patcher.has('prompt') && !patcher.inFlight) showReading(server.value.reading);
    clearMessage('poll');
  } else if (server.reason?.status === 404) {
    if (pc.connectionState !== 'connected') {
      // The server reaps a session whose peer has not connected within its connect timeout (5 s by default).
      await connectionFailed(run);
    } else {
      await stop({ reason: 'The server has ended this session. Press Start to begin a new one.' });
    }
    return;
  } else {
    showMessage('warning', `Live stats unavailable (${describeFailure(server.reason)}).`, { key: 'poll' });
  }

  ui.statEdited.textContent = stats ? `${fmt(stats.edited_fps, 1)} fps` : '–';
  ui.statReceived.textContent = inbound ? `${fmt(inbound.fps, 1)} fps` : '–';
  const jitter = inbound?.jitterMs ?? null;
  ui.statLatency.textContent = stats
    ? `${fmt(stats.latency_ms_p50)} / ${fmt(stats.latency_ms_p95)} ms` + (jitter === null ? '' : ` +${fmt(jitter)} buffer`)
    : '–';
  ui.statLatency.title = 'Server capture-to-send p50 / p95, plus the browser jitter buffer';
  ui.statDropped.textContent = `${stats ? stats.dropped : '–'} server · ${inbound ? inbound.framesDropped : '–'} here`;
  ui.statDropped.title = 'Frames dropped by the server (newest frame wins) · by the browser decoder';
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring

function init() {
  setPhase('idle');
  wireControls();
  ui.start.addEventListener('click', () => start());
  ui.stop.addEventListener('click', () => stop());
  ui.camera.addEventListener('change', () => switchCamera());
  ui.output.addEventListener('resize', () => fitSendSize());
  navigator.mediaDevices?.addEventListener?.('devicechange', () => refreshCameras().catch(() => {}));
  window.addEventListener('pagehide', endOnUnload);
  refreshCameras().catch(() => {});
  loadModelInfo();
}

init();
