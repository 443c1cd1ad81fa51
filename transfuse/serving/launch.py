"""Running the app of serving/server.py with uvicorn, and shutting it down cleanly.

    run_server(create_app(engine, tokenizer, name, max_seq_len=n), engine, port=8000)

On SIGTERM or SIGINT (the first one): the server stops taking requests (``/health`` and new
requests answer 503), the engine cancels what is in flight in a helper thread (open streams
end with ``finish_reason: "cancelled"`` and ``[DONE]``, plain requests get a 503), uvicorn
finishes its graceful shutdown (open connections end, at most :data:`GRACEFUL_SHUTDOWN_S`),
and the engine thread is joined; every cache block is back in the pool (a warning says
otherwise). Then :func:`run_server` returns normally, so ``transfuse serve`` exits with 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: seconds uvicorn waits for open connections at shutdown before cancelling them
GRACEFUL_SHUTDOWN_S = 30


def run_server(app: Any, engine: Any, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGTERM/SIGINT, then shut down cleanly (module
    docstring); returns normally afterwards."""
    import uvicorn

    state = app.state.serving  # serving.server.ServerState
    stopper = threading.Thread(target=engine.shutdown, kwargs={"cancel": True},
                               name="transfuse-shutdown")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.closing:  # first signal: refuse new work, end what runs
                logger.info("signal %s: shutting down (in-flight requests are cancelled)",
                            signal.Signals(sig).name)
                state.closing = True
                stopper.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn re-raises the signal it caught once it has stopped, with the handler that was
    # there before it: make that a no-op so a SIGTERM'd server exits with status 0
    previous = {s: signal.signal(s, _ignore_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        state.closing = True
        if stopper.is_alive():
            stopper.join()
        engine.shutdown(cancel=True)
    stats = engine.stats()
    if stats.get("blocks_free") != stats.get("blocks_total"):
        logger.warning("after shutdown %s of %s cache blocks are free", stats.get("blocks_free"),
                       stats.get("blocks_total"))
    logger.info("stopped: %s requests finished, %s cancelled, %s failed",
                stats.get("finished"), stats.get("cancelled"), stats.get("errors"))


def _ignore_signal(sig: int, frame: Any) -> None:
    pass


__all__ = ["GRACEFUL_SHUTDOWN_S", "run_server"]
