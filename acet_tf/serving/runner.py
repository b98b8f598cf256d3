"""Runs a WSGI app on a socket with cheroot until SIGTERM or SIGINT (the serve binary's loop)."""

import signal
import threading

from absl import logging
from cheroot import wsgi

# A client that stops sending mid-request frees its thread after this many seconds.
SOCKET_TIMEOUT_S = 30


def serve(
  wsgi_app,
  host,
  port,
  *,
  num_threads=32,
  socket_timeout_s=SOCKET_TIMEOUT_S,
  keep_alive_limit=64,
  shutdown_timeout_s=60.0,
  description='',
  on_stop=None,
):
  """Serves `wsgi_app` on host:port with cheroot until SIGTERM or SIGINT.

  cheroot: HTTP/1.1 keep-alive (up to keep_alive_limit idle connections kept), a fixed pool of
  num_threads workers (further connections wait in the listen backlog), socket_timeout_s for a
  client that stops sending or an idle kept-alive connection. Call from the main thread. On the
  signal it stops accepting, lets the workers finish the requests in flight (up to
  shutdown_timeout_s), calls on_stop() and returns.
  """
  server = wsgi.Server(
    (host, port),
    wsgi_app,
    numthreads=num_threads,
    max=num_threads,
    timeout=socket_timeout_s,
    shutdown_timeout=shutdown_timeout_s,
    request_queue_size=max(64, num_threads),
  )
  server.keep_alive_conn_limit = keep_alive_limit
  server.prepare()  # Binds: port 0 becomes a real port.
  stop = threading.Event()
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
  thread = threading.Thread(target=server.serve, name='cheroot')
  thread.start()
  logging.info('Serving %s at http://%s:%d', description, host, server.bind_addr[1])
  try:
    while not stop.wait(0.5) and thread.is_alive():
      pass
    logging.info('Signal received: shutting down.')
  finally:
    server.stop()  # Closes the socket, then joins the workers as they finish their requests.
    thread.join()
    if on_stop is not None:
      on_stop()
    for s, handler in previous.items():
      signal.signal(s, handler)
  logging.info('Server stopped.')
