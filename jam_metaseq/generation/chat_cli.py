"""``jam chat CHECKPOINT``: talk to a JAM model in the terminal, text and pictures both ways
(issue 25; docs/CONVERSATIONS.md).

    jam chat runs/quickstart/instruct/... --image-tokenizer runs/quickstart/tokenizers/vq

Each line you type is a user turn; the answer streams as it is written, and every picture it draws
is saved as a PNG under ``--out`` (default ``chat-images/``) as soon as its last code is chosen,
its path printed. The conversation keeps its KV cache between turns, so the next answer starts
without re-reading the history. Commands: ``/image PATH [text]`` sends a picture (and text) in
your turn, ``/new`` starts a new conversation, ``/quit`` (or Ctrl-D) leaves; Ctrl-C stops the
answer being written.

The model and decoding flags are ``generation.options``' table (shared with ``jam-generate``);
``add_chat_args`` puts them on ``jam chat`` and ``jam serve``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence, TextIO

from jam_metaseq.errors import run_cli

from .chat import ChatEvent, ChatModel, ChatSession
from .options import DTYPES, add_options, generation_config


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint and the model and decoding flags of ``jam chat`` and ``jam serve``
    (``options.OPTIONS``' rows for chats, shared with ``jam-generate``)."""
    p.add_argument("checkpoint", help="checkpoint file or directory (any layout jam-ckpt reads); its vocabulary "
                   "manifest needs conversation tokens")
    add_options(p, "chat")


def chat_model_from_args(args: argparse.Namespace) -> ChatModel:
    config = generation_config(args)  # bad values fail before the model loads
    return ChatModel.load(args.checkpoint, vocab=args.vocab, tokenizer=args.tokenizer,
                          image_tokenizer=args.image_tokenizer, device=args.device, dtype=DTYPES[args.dtype],
                          decode=args.decode, config=config, trust_pickle=args.trust_pickle)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jam chat", description=__doc__.split("\n\n")[0],
                                epilog="In the chat: /image PATH [text], /new, /quit; Ctrl-C stops an answer.")
    add_chat_args(p)
    p.add_argument("--out", default="chat-images", help="folder for the pictures drawn (default: chat-images)")
    return p


def _save_png(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def chat_loop(session: ChatSession, *, out_dir: Path, stdin: TextIO, stdout: TextIO) -> int:
    """Read turns from ``stdin`` until EOF or ``/quit``; stream answers to ``stdout``."""
    conversation = 1
    turn = 0
    stop = {"asked": False}

    def on_event(e: ChatEvent) -> None:
        if e.kind == "text":  # control characters (a terminal's escape sequences) are not passed on
            stdout.write("".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in e.text))
        elif e.kind == "image_start":
            stdout.write("\n[drawing a picture ...]")
        elif e.kind == "image":
            if e.png is not None:
                path = out_dir / f"chat{conversation}-turn{turn}-image{e.index + 1}.png"
                _save_png(e.png, path)
                stdout.write(f"\n[picture: {path}]\n")
            else:
                stdout.write(f"\n[picture as codes (no --image-tokenizer): {e.codes}]\n")
        elif e.kind == "done" and e.finish_reason != "eot":
            stdout.write(f"\n[{e.finish_reason}]")
        stdout.flush()

    def interrupt(_signum, _frame) -> None:
        stop["asked"] = True

    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            stdout.write("\n")
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/new":
            session.reset()
            conversation += 1
            turn = 0
            stdout.write("[new conversation]\n")
            continue
        image = None
        if line.startswith("/image"):
            parts = line.split(maxsplit=2)
            if len(parts) < 2:
                stdout.write("[usage: /image PATH [text]]\n")
                continue
            try:
                from PIL import Image

                with Image.open(parts[1]) as im:
                    image = im.convert("RGB")
            except OSError as e:
                stdout.write(f"[cannot read picture {parts[1]}: {e}]\n")
                continue
            line = parts[2] if len(parts) > 2 else ""
        turn += 1
        stdout.write("jam> ")
        stdout.flush()
        stop["asked"] = False
        previous = signal.signal(signal.SIGINT, interrupt) if _main_thread() else None
        try:
            session.say(line, image=image, on_event=on_event, should_stop=lambda: stop["asked"])
        except ValueError as e:  # a message the model cannot take: say so, keep chatting
            stdout.write(f"[{e}]\n")
            turn -= 1
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        stdout.write("\n")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        session = chat_model_from_args(args).session()
        print(f"jam chat: {args.checkpoint} ({session.conversation.engine.decode_mode} decoding). "
              "/image PATH [text], /new, /quit; Ctrl-C stops an answer.", file=sys.stderr)
        return chat_loop(session, out_dir=Path(args.out), stdin=sys.stdin, stdout=sys.stdout)

    return run_cli("jam chat", run)


if __name__ == "__main__":
    sys.exit(main())
