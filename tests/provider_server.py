"""A local HTTP server that answers as an LLM provider would, from a script of replies.

Each reply is (status, body, headers, delay_s); bodies are JSON-encoded unless bytes. Every
request is recorded (path, headers with lower-case names, decoded body, arrival time) so tests check what the
client sent as well as how it read the answers. When the script runs out, the last reply repeats.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def openai_reply(content="hello", prompt_tokens=10, completion_tokens=5, cached_tokens=0, **usage_extra):
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}, **usage_extra}}


def anthropic_reply(text="hello", input_tokens=10, output_tokens=5, cache_read=0, cache_write=0):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write}}


def openai_error(message, kind="invalid_request_error", code=None):
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def anthropic_error(message, kind):
    return {"type": "error", "error": {"type": kind, "message": message}}


class ProviderServer:
    def __init__(self):
        self.replies = [(200, openai_reply(), {}, 0.0)]
        self.requests = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server._lock:
                    index = len(server.requests)
                    server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                            "body": json.loads(body), "time": time.monotonic()})
                    status, reply, headers, delay = server.replies[min(index, len(server.replies) - 1)]
                if delay:
                    server.stopping.wait(delay)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def script(self, *replies):
        """Replies in order: (status, body) or (status, body, headers) or (status, body, headers, delay_s)."""
        self.replies = [tuple(r) + ({}, 0.0)[len(r) - 2:] for r in replies]

    def close(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
