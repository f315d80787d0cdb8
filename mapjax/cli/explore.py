"""``mapjax explore POOL``: a live palette explorer in the browser, served from this process (``mapjax.explore``).

The pool is loaded, the port taken and the solver compiled before the server answers, so a pool that cannot be
read or a port in use stops the command at once with the reason (exit 2), and the first slider move is as fast
as the next. The server needs
the optional extra (``pip install 'mapjax[explore]'``); without it the command says so and exits 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from mapjax.cli.common import EXIT_OK, add_parser, normaliser


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port lies in 0-65535 (0: any free port), got {text!r}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "explore", help="a live palette explorer in the browser")
    command.add_argument("pool", help="pool file: .json (the authors' schema), .jsonl or .parquet (.gz too)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    command.add_argument("--port", type=port_number, default=8765, help="port (default 8765; 0: any free port)")
    command.add_argument("--per-prompt", action="store_true", help="per-prompt normaliser (matches MAP-D decoding)")
    command.add_argument("--open", action="store_true", help="open the page in the default browser")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax.explore.server import bind, require_server, serve
    from mapjax.explore.session import ExploreSession
    from mapjax.pool import RewardPool

    require_server()
    pool = RewardPool.load(args.pool)
    listener = bind(args.host, args.port)   # a port in use is refused before the solver compiles
    try:
        session = ExploreSession(pool, normaliser=normaliser(args.per_prompt), source=str(args.pool))
    except BaseException:
        listener.close()
        raise

    def announce(url: str) -> None:
        print(f"mapjax explore: {args.pool}: {pool.num_prompts} prompts, {pool.num_samples} samples, "
              f"{pool.num_values} values; solver warm in {session.warm_seconds:.1f} s", flush=True)
        print(f"mapjax explore: serving {url} (Ctrl+C stops)", flush=True)

    serve(session, args.host, args.port, listener=listener, open_browser=args.open, announce=announce)
    return EXIT_OK
