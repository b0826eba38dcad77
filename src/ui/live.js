// The monitor's live updates: refetches the page's <main> when the status
// table changes, and after a reconnect. Served as a file (not inline) so
// the pages' Content-Security-Policy can forbid inline script.
(function () {
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { headers: { 'X-Renderq-Fragment': '1' } }).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (t) {
      if (t) { var m = document.querySelector('main'); if (m) { m.outerHTML = t; } }
    }).finally(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  // The server ends each stream after a while (the browser reconnects by
  // itself) and refuses one when too many are open (503: the browser gives
  // up, so this tries again later).
  function connect() {
    var es = new EventSource('/ui/live');
    es.addEventListener('changed', refresh);
    es.addEventListener('open', refresh);
    es.addEventListener('error', function () {
      if (es.readyState === EventSource.CLOSED) {
        setTimeout(connect, 15000 + Math.random() * 15000);
      }
    });
  }
  connect();
})();
