"""A local HTTP server on 127.0.0.1 for the tests and the benchmark: it serves bytes by path and counts requests."""
import http.server
import threading
import time
from collections import Counter


class ManyConnections(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted: a real image host takes many at once


class FileServer:
    """Serves `files` (path -> bytes), each answer after `delay` seconds (a round trip to a distant host).

    `failures[path]` is a list of answers given before the real file: an HTTP status code, or (code, headers);
    `hold` is a set of paths whose requests wait until `release` is set.
    """

    def __init__(self, delay=0.0):
        self.files, self.failures, self.hold = {}, {}, set()
        self.requests = Counter()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] += 1
                time.sleep(delay)
                if self.path in server.hold:
                    server.release.wait(timeout=60)
                failures = server.failures.get(self.path)
                if failures:
                    code, headers = failures.pop(0) if isinstance(failures[0], tuple) else (failures.pop(0), {})
                    self.send_response(code)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path in server.files:
                    body = server.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = ManyConnections(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
