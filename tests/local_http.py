"""A threaded HTTP server on 127.0.0.1 for tests: it serves one folder and stops when the test ends."""
import contextlib
import functools
import threading
from http.server import ThreadingHTTPServer


@contextlib.contextmanager
def serving(folder, handler):
    "Serve `folder` with the request `handler` class on a free port of 127.0.0.1; yields the base URL."
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
