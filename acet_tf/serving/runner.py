"""Runs a WSGI app on a socket with waitress until SIGTERM or SIGINT (the serve binary's loop).

Why waitress and not cheroot: cheroot hands every accepted connection to a worker thread at once,
and the worker blocks reading the request line and headers (up to the socket timeout); only
between requests does a kept-alive connection wait in its selector. So N clients that connect and
send nothing (or send headers byte by byte) hold N of the fixed pool's workers and a good request
waits behind them. waitress reads each request, headers and body, in its event loop (poll) and
gives a worker only a complete request: an idle or slow connection costs a socket and a buffer.
"""

import signal
import socket
import threading
import time

from absl import logging
from waitress import channel as waitress_channel
from waitress import server as waitress_server
from waitress import task as waitress_task
from waitress import wasyncore

# A client silent this long (mid-request or idle between requests) is disconnected.
SOCKET_TIMEOUT_S = 30
# Open connections at once; past it the server stops accepting until some close (the listen
# backlog holds the rest). Each costs a file descriptor and a few KB, nothing else.
MAX_CONNECTIONS = 4096


def _in_flight(channel):
  """A connection with a request started, queued, running or not yet written back, or with
  bytes the event loop has not read yet."""
  return bool(
    channel.request is not None
    or channel.requests
    or channel.total_outbufs_len
    or _unread(channel.socket)
  )


def _channel_class(draining):
  """waitress's connection, whose answers close it (Connection: close) once `draining` is set.

  Otherwise a kept-alive client sends its next request on the same connection, which the drain
  must then wait for too: a client that keeps sending would keep the server from stopping."""

  class Task(waitress_task.WSGITask):
    def build_response_header(self):
      if draining.is_set():
        self.set_close_on_finish()
      return super().build_response_header()

  class Channel(waitress_channel.HTTPChannel):
    task_class = Task

  return Channel


def _unread(sock):
  """True if the client's bytes wait in the socket. A request sent on a kept-alive connection
  just before the signal can still be there when the drain looks; closing that connection as idle
  would drop a request sent before the signal (waitress ignores what it reads after will_close)."""
  try:
    return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
  except OSError:  # Nothing to read (BlockingIOError), or already closed.
    return False


def serve(
  wsgi_app,
  host,
  port,
  *,
  num_threads=32,
  socket_timeout_s=SOCKET_TIMEOUT_S,
  max_connections=MAX_CONNECTIONS,
  max_header_bytes=64 << 10,
  max_body_bytes=1 << 30,
  shutdown_timeout_s=60.0,
  description='',
  on_signal=None,
  on_stop=None,
  on_started=None,
):
  """Serves `wsgi_app` on host:port with waitress until SIGTERM or SIGINT.

  num_threads workers run complete requests; reading and writing happen in one event loop, so
  idle or slow connections hold no worker. A connection silent for socket_timeout_s is closed;
  headers past max_header_bytes and bodies past max_body_bytes are refused by waitress before the
  app sees them (the app has its own, smaller, body limit with a JSON error). Call from the main
  thread. On the signal: stop accepting, close idle connections, let the requests in flight
  (unread, started, queued, running or being written) finish for up to shutdown_timeout_s, each
  answer closing its connection, then on_stop() and return. on_signal() right after the signal
  (to stop other servers at the same time); on_started(port) once bound (port 0 becomes a real
  one).
  """
  server = waitress_server.create_server(
    wsgi_app,
    host=host,
    port=port,
    threads=num_threads,
    channel_timeout=socket_timeout_s,
    cleanup_interval=max(0.5, min(30.0, socket_timeout_s / 5)),
    connection_limit=max_connections,
    max_request_header_size=max_header_bytes,
    max_request_body_size=max_body_bytes,
    asyncore_use_poll=True,  # select() cannot watch more than 1024 descriptors.
    ident='acet_tf',
    clear_untrusted_proxy_headers=True,
  )
  draining = threading.Event()
  server.channel_class = _channel_class(draining)
  bound_port = int(server.effective_port)
  stop = threading.Event()
  previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
  thread = threading.Thread(target=server.run, name='waitress')
  thread.start()
  logging.info('Serving %s at http://%s:%d', description, host, bound_port)
  if on_started is not None:
    on_started(bound_port)
  try:
    while not stop.wait(0.5) and thread.is_alive():
      pass
    logging.info('Signal received: shutting down.')
    draining.set()
    if on_signal is not None:
      on_signal()
  finally:
    _drain(server, thread, shutdown_timeout_s)
    if on_stop is not None:
      on_stop()
    for s, handler in previous.items():
      signal.signal(s, handler)
  logging.info('Server stopped.')


def _drain(server, thread, timeout_s):
  """Stops accepting, waits for the requests in flight, then ends the event loop."""
  # The event loop owns the sockets: changes run there, through the server's trigger.
  server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))  # Closes the listener.
  deadline = time.monotonic() + timeout_s
  busy = [True]

  def close_idle():  # Idle kept-alive connections are closed; counts those still busy.
    channels = list(server.active_channels.values())
    for c in channels:
      if not _in_flight(c):
        c.will_close = True
    busy[0] = sum(map(_in_flight, channels))

  while thread.is_alive() and time.monotonic() < deadline:
    server.trigger.pull_trigger(close_idle)
    time.sleep(0.05)
    if not busy[0]:
      break
  server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
  thread.join(timeout=10)
  server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
