"""The WSGI entry point for gunicorn: ``gunicorn -c gunicorn.conf.py`` (which names it) or
``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker chat.wsgi:app``.
"""

from .app import create_app

app = create_app()
