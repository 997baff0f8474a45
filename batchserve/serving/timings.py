"""Where one request's time went: reading and decoding its body, waiting in the queue, the
model and the index. The service fills it in; the API reports it in the response's
``timings_ms`` and its ``Server-Timing`` header (which browsers' developer tools show)."""

from __future__ import annotations

from dataclasses import dataclass

#: The stages, in the order a request goes through them.
STAGES = ("decode", "queue", "model", "search", "verify")


@dataclass
class Timings:
    """Seconds per stage of one request; for a request of several images, the stages of the
    image that finished last (the one the client waited for)."""

    decode_s: float = 0.0
    queue_s: float = 0.0
    model_s: float = 0.0
    search_s: float = 0.0
    #: Verifying the matches of a verified search (serving/verifying.py).
    verify_s: float = 0.0

    def through_pipeline(self, total_s: float, model_s: float, search_s: float) -> None:
        """Record a request's images back from the pipeline ``total_s`` after they were
        queued, of which ``model_s`` in the model and ``search_s`` in the index."""
        self.model_s, self.search_s = model_s, search_s
        self.queue_s = max(0.0, total_s - model_s - search_s)

    def as_ms(self) -> dict[str, float]:
        seconds = (self.decode_s, self.queue_s, self.model_s, self.search_s, self.verify_s)
        return {stage: round(s * 1000.0, 3) for stage, s in zip(STAGES, seconds, strict=True)}

    def server_timing(self) -> str:
        """The ``Server-Timing`` header's value (W3C Server Timing)."""
        return ", ".join(f"{stage};dur={ms}" for stage, ms in self.as_ms().items())
