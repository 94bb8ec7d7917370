"""``greenchat bench``: a websocket load generator leaner than the server it tests.

In the 2015 experiment the load tool died first (tsung, of memory, at ~500k). Here a
client connection costs a socket and a few array slots in a load process that waits on
epoll: no greenlet, thread or coroutine per connection. No module here imports gevent or
Flask; the peers' packages (websockets, picows, uvloop) are optional extras, imported only
by the peer processes.

| question | module |
|---|---|
| how does one load process hold ~19,000 connections and time the probes? | ``loadclient`` |
| how are connections spread over processes and source addresses? | ``plan`` |
| the load processes (the command line's "workers") and the pipe to each | ``processes`` |
| the phases of a run: rate, hold, steps, probes, drain; ``--compare`` | ``runner`` |
| a reconnect storm: restart the server, time the clients' return (``--storm``) | ``storm`` |
| what the server and the machine did meanwhile (``/stats``, /proc) | ``observe`` |
| will the kernel allow the plan, and how to fix it if not (``chat.checks``) | ``preflight`` |
| the endpoint under test: its URL, one handshake before any load | ``endpoint`` |
| latency percentiles from several processes | ``histogram`` |
| the table, ``--json``, ``--plot``, the progress line | ``report`` |
| which servers ``--compare`` runs beside the target, and how each is started | ``peers`` |
| the ``websockets`` library's broadcast server (a peer) | ``peer_websockets`` |
| ``picows`` on uvloop (a peer) | ``peer_picows`` |
| the floor every cost is read against: a fixed 101 and a bare ``send`` loop | ``floor`` |

The command line is in ``chat/cli.py``; ``runner.main`` runs it.
"""
