// dva's live web view: polls the management API every second and redraws in place.
//
// The token: taken from the URL fragment (`/ui#token=...`: browsers never send the fragment to
// the server, and it is removed from the address bar at once) or typed in, kept in
// sessionStorage (this tab only, gone when it closes) and sent only as the Authorization header
// of same-origin fetch() calls; a 401 forgets it. Everything the API returns (appliance names
// come from user specs) is put into the DOM as text nodes, never parsed as HTML.
'use strict';

(() => {
  const POLL_MS = 1000;
  const EVENTS_SHOWN = 40;
  const TOKEN_KEY = 'dva-token';
  const SELECTED_KEY = 'dva-appliance';

  const $ = (id) => document.getElementById(id);

  class Unauthorized extends Error {}

  // Previous counters per appliance/unit, for rates: {time_ms, uptime, rx_packets, rx_bytes, drops}.
  let previous = new Map();
  let polls = 0;
  let timer = null;

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function takeTokenFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const t = params.get('token');
    if (t) {
      sessionStorage.setItem(TOKEN_KEY, t);
    }
    if (location.hash) {
      // Out of the address bar and the history, where it could be copied or shoulder-surfed.
      history.replaceState(null, '', location.pathname + location.search);
    }
  }

  async function api(path) {
    const r = await fetch(path, {
      headers: { Authorization: 'Bearer ' + token() },
      cache: 'no-store',
      credentials: 'omit',
      redirect: 'error',
    });
    if (r.status === 401) {
      throw new Unauthorized('the server refused the token');
    }
    if (!r.ok) {
      let why = r.statusText;
      try {
        why = (await r.json()).error.message;
      } catch (_) { /* not our JSON error: keep the status text */ }
      throw new Error(`${path}: ${r.status} ${why}`);
    }
    return r.json();
  }

  // A DOM element with text children only (strings become text nodes).
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'class') {
        e.className = v;
      } else if (k === 'data') {
        for (const [dk, dv] of Object.entries(v)) {
          e.dataset[dk] = String(dv);
        }
      } else {
        e.setAttribute(k, String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function badge(state) {
    // Class names from a fixed set only: an unknown state gets none.
    const known = ['ready', 'up', 'pending', 'starting', 'draining', 'deleting', 'degraded',
      'error', 'failed', 'down', 'stopped'];
    return el('span', { class: 'badge' + (known.includes(state) ? ' s-' + state : '') }, state);
  }

  function si(x, unit) {
    if (x === null || x === undefined) return '–';
    const steps = [[1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
    for (const [f, p] of steps) {
      if (x >= f) return (x / f).toFixed(1) + ' ' + p + unit;
    }
    return (x < 10 && x > 0 ? x.toFixed(1) : Math.round(x)) + (unit ? ' ' + unit : '');
  }

  function num(text) {
    return el('td', { class: 'num' }, text);
  }

  // Rates of one appliance's units from this read and the previous one.
  function rates(name, stats) {
    const out = new Map();
    if (!stats) return out;
    for (const u of stats.units) {
      if (!u.answered) continue;
      const key = name + '\u0000' + u.id;
      const now = { time_ms: stats.time_ms, uptime: u.uptime_secs, rx_packets: u.rx_packets,
        rx_bytes: u.rx_bytes, drops: u.drops };
      const before = previous.get(key);
      previous.set(key, now);
      const dt = before ? (now.time_ms - before.time_ms) / 1000 : 0;
      // A restarted unit (uptime went down) begins a new series: no rate from across it.
      if (!before || dt <= 0 || now.uptime < before.uptime) continue;
      const per = (k) => Math.max(0, now[k] - before[k]) / dt;
      out.set(u.id, { pps: per('rx_packets'), bps: per('rx_bytes'), dps: per('drops') });
    }
    return out;
  }

  function renderList(list, selected) {
    const nav = $('appliances');
    nav.replaceChildren(...list.map((a) => {
      const b = el('button', { type: 'button', class: a.name === selected ? 'selected' : '' },
        a.name + ' ', badge(a.status));
      b.addEventListener('click', () => {
        sessionStorage.setItem(SELECTED_KEY, a.name);
        schedule(0);
      });
      return b;
    }));
    $('empty').hidden = list.length > 0;
    $('appliance').hidden = list.length === 0;
  }

  function renderAppliance(app, stats, events) {
    const r = rates(app.name, stats);
    $('app-name').textContent = app.name;
    $('app-status').replaceWith(Object.assign(badge(app.status), { id: 'app-status' }));
    $('dp-count').textContent = String(app.dataplanes.ready);
    $('dp-desired').textContent = String(app.dataplanes.desired);
    $('dp-draining').textContent = String(app.dataplanes.draining);
    $('dp-min').textContent = String(app.dataplanes.min);
    $('dp-max').textContent = String(app.dataplanes.max);
    $('generation').textContent = String(app.generation);
    $('config-version').textContent = String(app.config_version);
    let pps = 0;
    let bps = 0;
    for (const v of r.values()) {
      pps += v.pps;
      bps += v.bps;
    }
    $('total-pps').textContent = si(pps, '');
    $('total-bps').textContent = si(bps, 'B/s');
    $('app-error').hidden = !app.error;
    $('app-error').textContent = app.error || '';

    // Bucket ownership: one row per data plane still running, and one stacked bar.
    const dps = app.units.filter((u) => u.role === 'dataplane' && u.state !== 'stopped');
    const total = dps.reduce((s, u) => s + (u.buckets || 0), 0);
    const colour = (i) => 'c' + (i % 8);
    $('bucket-bar').replaceChildren(...dps.filter((u) => u.buckets > 0).map((u) => {
      const seg = el('div', { class: colour(dps.indexOf(u)), title: `unit ${u.id}: ${u.buckets} buckets` });
      seg.style.width = (100 * u.buckets / total) + '%';
      return seg;
    }));
    $('owners').tBodies[0].replaceChildren(...dps.map((u, i) => {
      const bar = el('div', { class: 'bar ' + colour(i) });
      bar.style.width = total > 0 ? (100 * (u.buckets || 0) / total) + '%' : '0';
      const s = stats && stats.units.find((x) => x.id === u.id);
      return el('tr', { data: { unit: u.id, buckets: u.buckets || 0, flows: u.flows } },
        el('td', {}, 'unit ' + u.id), el('td', {}, u.host), el('td', {}, badge(u.state)),
        num(String(u.buckets || 0)), el('td', { class: 'wide' }, bar), num(String(u.flows)),
        num(s && s.answered ? String(s.active_flows) : '–'));
    }));

    // Units, grouped by host.
    const units = [...app.units].sort((a, b) => a.host.localeCompare(b.host) || a.id - b.id);
    const rows = [];
    let host = null;
    for (const u of units) {
      if (u.host !== host) {
        host = u.host;
        rows.push(el('tr', { class: 'host' }, el('td', { colspan: 11 }, host)));
      }
      const rate = r.get(u.id);
      const role = u.role + (u.leader ? ' (leader)' : '');
      rows.push(el('tr', { data: { unit: u.id, role: u.role } },
        el('td', {}, ''), el('td', {}, String(u.id)), el('td', {}, role), el('td', {}, badge(u.state)),
        num(u.pid === null || u.pid === undefined ? '–' : String(u.pid)), num('v' + u.config_version),
        num(rate && u.role !== 'manager' ? si(rate.pps, '') : '–'),
        num(rate && u.role !== 'manager' ? si(rate.bps, 'B/s') : '–'),
        num(rate && u.role !== 'manager' ? si(rate.dps, '') : '–'),
        num(u.role === 'dataplane' ? String(u.flows) : ''),
        el('td', { class: 'error' }, u.error || '')));
    }
    $('units').tBodies[0].replaceChildren(...rows);

    const backends = app.backends || [];
    $('backends-section').hidden = backends.length === 0;
    $('backends').tBodies[0].replaceChildren(...backends.map((b) => el('tr', {},
      el('td', {}, b.service), el('td', {}, b.backend), el('td', {}, badge(b.health)),
      num(`${b.up_votes}/${b.checks}`), el('td', { class: 'error' }, b.error || ''))));

    const shown = (events || []).slice(-EVENTS_SHOWN).reverse();
    $('events').replaceChildren(...shown.map((e) => {
      const t = new Date(e.time_ms);
      return el('li', { data: { reason: e.reason } },
        el('time', { datetime: t.toISOString() }, t.toLocaleTimeString()),
        el('span', { class: 'reason' }, e.reason), e.message);
    }));
  }

  function setStatus(text, error) {
    const s = $('status');
    s.textContent = text;
    s.className = error ? 'error' : '';
  }

  async function poll() {
    try {
      const list = await api('/v1/appliances');
      let selected = sessionStorage.getItem(SELECTED_KEY);
      if (!list.some((a) => a.name === selected)) {
        selected = list.length ? list[0].name : null;
      }
      renderList(list, selected);
      const app = list.find((a) => a.name === selected);
      if (app) {
        const path = '/v1/appliances/' + encodeURIComponent(app.name);
        // Counters are a bonus: an appliance whose units cannot be read still shows its state.
        const [stats, events] = await Promise.all([
          api(path + '/stats').catch(() => null),
          api(path + '/events'),
        ]);
        renderAppliance(app, stats, events);
      }
      polls += 1;
      document.body.dataset.polls = String(polls);
      setStatus('live · updated ' + new Date().toLocaleTimeString(), false);
    } catch (e) {
      if (e instanceof Unauthorized) {
        login('The server refused the token: enter it again.');
        return;
      }
      // Keep the last figures on screen, marked stale, and keep trying.
      setStatus('not updating: ' + e.message, true);
    }
    schedule(POLL_MS);
  }

  function schedule(ms) {
    clearTimeout(timer);
    // A poll still in flight when the token was forgotten must not start the loop again.
    if (token()) {
      timer = setTimeout(poll, ms);
    }
  }

  function login(why) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    previous = new Map();
    $('view').hidden = true;
    $('forget').hidden = true;
    $('login').hidden = false;
    $('login-why').textContent = why || '';
    setStatus('not connected', false);
    $('token').focus();
  }

  function start() {
    $('login').hidden = true;
    $('view').hidden = false;
    $('forget').hidden = false;
    setStatus('connecting', false);
    schedule(0);
  }

  document.addEventListener('DOMContentLoaded', () => {
    takeTokenFromFragment();
    $('login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('token').value.trim();
      $('token').value = '';
      if (t) {
        sessionStorage.setItem(TOKEN_KEY, t);
        start();
      }
    });
    $('forget').addEventListener('click', () => login(''));
    if (token()) {
      start();
    } else {
      login('');
    }
  });
})();
