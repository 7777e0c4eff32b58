"""``jam serve CHECKPOINT``: talk to a JAM model on a local web page (issue 25; docs/CONVERSATIONS.md).

    jam serve runs/quickstart/instruct/... --image-tokenizer runs/quickstart/tokenizers/vq --port 8000

Open the printed address: each browser tab holds its own conversation; answers stream as they are
written, pictures appear as soon as they are drawn, a picture can go with your message, and Stop /
New conversation do what they say. It listens on 127.0.0.1 (this machine only) unless ``--host``
says otherwise; nothing on the page can read files of the server. The model and decoding flags are
``jam chat``'s.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Sequence

from jam_metaseq.errors import run_cli
from jam_metaseq.inputs import POSITIVE_FLOAT, bounded_int
from jam_metaseq.generation.chat_cli import add_chat_args, chat_model_from_args


def build_parser() -> argparse.ArgumentParser:
    from .app import ServeLimits

    d = ServeLimits()
    p = argparse.ArgumentParser(prog="jam serve", description=__doc__.split("\n\n")[0])
    add_chat_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    s.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="port (default 8000; 0 = any free port)")
    s.add_argument("--max-conversations", type=int, default=d.max_conversations,
                   help="conversations kept, each with its KV cache (the least recently used idle one is "
                   f"forgotten first; default {d.max_conversations})")
    s.add_argument("--max-generating", type=int, default=d.max_generating,
                   help=f"answers written at once; more are refused as busy (default {d.max_generating})")
    s.add_argument("--max-upload-mb", type=POSITIVE_FLOAT, default=d.max_image_bytes / 2**20,
                   help=f"largest picture a visitor may send, MiB (default {d.max_image_bytes / 2**20:.0f})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        try:
            import uvicorn

            from .app import ServeLimits, create_app
        except ImportError as e:
            raise ImportError(f"jam serve needs the serve extra: pip install 'jam_metaseq[serve]' ({e})") from None
        for name in ("max_conversations", "max_generating"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 < args.max_upload_mb <= 64:
            raise ValueError("--max-upload-mb must be in (0, 64]")
        image_bytes = int(args.max_upload_mb * 2**20)
        limits = ServeLimits(max_conversations=args.max_conversations, max_generating=args.max_generating,
                             max_image_bytes=image_bytes, max_body_bytes=image_bytes * 4 // 3 + (1 << 16))
        app = create_app(chat_model_from_args(args), limits=limits)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"jam serve: listening on {args.host}: anyone who can reach this machine can use the model",
                  file=sys.stderr)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))  # bound here, so --port 0 can print the port it got
        port = sock.getsockname()[1]
        sock.listen(128)  # connections wait in the backlog until the server accepts them
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"jam serve: open http://{host}:{port}/ (Ctrl-C stops the server)", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
        return 0

    return run_cli("jam serve", run)


if __name__ == "__main__":
    sys.exit(main())
