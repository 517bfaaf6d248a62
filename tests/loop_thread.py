"""A server running on pyvmm's EventLoop in a background thread, for tests.

Subclasses create `self.loop` and a started `self.server` (anything with
`client_count` and `close()`), then call `start_loop()`.
"""

from __future__ import annotations

import threading
import time


class LoopThread:
    loop = None
    server = None

    def start_loop(self) -> None:
        self.thread = threading.Thread(target=self.loop.run, name="test-loop", daemon=True)
        self.thread.start()

    def on_loop(self, function, timeout: float = 10.0):
        """Run function() on the loop thread and return its result (or raise its error)."""
        done = threading.Event()
        outcome = {}

        def job():
            try:
                outcome["value"] = function()
            except BaseException as error:  # re-raised in the test's thread
                outcome["error"] = error
            done.set()

        self.loop.call_soon_threadsafe(job)
        assert done.wait(timeout), "the event loop did not run the call"
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def wait_clients(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.on_loop(lambda: self.server.client_count) != count:
            assert time.monotonic() < deadline, f"expected {count} clients"
            time.sleep(0.01)

    def close(self) -> None:
        if self.thread.is_alive():
            self.on_loop(self.server.close)
            self.loop.stop()
            self.thread.join(10)
        self.loop.close()
