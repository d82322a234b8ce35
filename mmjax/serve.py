"""python -m mmjax.serve CKPT --port 8000: an OpenAI-compatible server for a converted checkpoint.

One process per host; docs/serving.md lists every flag and error and how to deploy it. SIGTERM
(or Ctrl-C): stop admitting (new requests get 503), let in-flight requests finish for up to
--shutdown-timeout seconds, abort the rest (their clients get an error), exit 0. A second
signal exits at once."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import uvicorn

__all__ = ["main", "parse_args"]

log = logging.getLogger("mmjax.serve")


def _domains(value: str) -> tuple[str, ...]:
    return tuple(d.strip().lower() for d in value.split(",") if d.strip())


def _positive_mb(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {value!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB, got {value!r}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmjax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a folder written by converters.torch2flax")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the `model` clients send (default: the checkpoint folder's name)")
    p.add_argument("--mesh", default=None, help='tensor/data parallel mesh, e.g. "model:8" (docs/sharding.md)')
    p.add_argument("--max-num-seqs", type=int, default=32, help="rows of the running batch")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per request (default: the model's context)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    p.add_argument("--encoder-cache-mb", type=int, default=256, help="image-feature cache size")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="cap on the KV-cache page pools")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                   help="KV-cache storage (auto: the model's dtype; int8: a scale per token and kv head)")
    p.add_argument("--api-key", default=os.environ.get("MMJAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MMJAX_API_KEY, else none)")
    p.add_argument("--allowed-media-domains", type=_domains, default=(),
                   help="comma-separated host names image_url may fetch from over http(s) (default: data: only)")
    p.add_argument("--max-request-mb", type=_positive_mb, default=32.0, help="request body limit (413 over it)")
    p.add_argument("--max-image-mb", type=_positive_mb, default=20.0, help="per-image limit (413 over it)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mmjax
    from mmjax.errors import MmjaxError
    from mmjax.serving.engine import ServingEngine
    from mmjax.serving.media import MediaLimits
    from mmjax.serving.server import Limits, build_app

    try:
        model = mmjax.load(args.checkpoint, mesh=args.mesh, kv_cache_dtype=args.kv_cache_dtype)
        engine = ServingEngine(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                               max_waiting=args.max_waiting, encoder_cache_mb=args.encoder_cache_mb,
                               page_size=args.page_size, kv_cache_mb=args.kv_cache_mb)
    except MmjaxError as e:
        print(f"mmjax.serve: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), shutdown_timeout_s=args.shutdown_timeout,
                    media=MediaLimits(max_bytes=int(args.max_image_mb * 2**20)))
    app = build_app(engine, name, api_key=args.api_key, allowed_media_domains=args.allowed_media_domains,
                    limits=limits)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = _DrainingServer(config, app.state.aeng, args.shutdown_timeout)
    log.info("serving %s as %r on http://%s:%d/v1", args.checkpoint, name, args.host, args.port)
    server.run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before uvicorn shuts down
    (uvicorn alone would wait on open streams forever, or cut them without a word)."""

    def __init__(self, config, aeng, timeout: float):
        super().__init__(config)
        self.aeng, self.timeout = aeng, timeout
        self._draining = False

    def handle_exit(self, sig, frame):
        if self._draining:  # a second signal: leave now
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("signal %s: draining (up to %.0fs), then exiting", signal.Signals(sig).name, self.timeout)

        def drain():
            try:
                self.aeng.shutdown(self.timeout)
            finally:
                self.should_exit = True  # set here, not by uvicorn: the signal is not re-raised, exit status 0

        threading.Thread(target=drain, name="mmjax-drain", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
