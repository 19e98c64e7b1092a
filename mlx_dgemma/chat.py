"""The chat REPL: `python -m mlx_dgemma.chat --model PATH [--think] [--system-prompt TEXT]`.

The conversation itself (cache reuse across turns, reasoning kept apart, cancelling) is `ChatSession` in
`session.py`, re-exported here.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

from .cli import (
    SAMPLER_FLAGS,
    Parser,
    add_distributed_flags,
    add_image_flags,
    add_sampler_flags,
    check_positive_flags,
    flag_message,
    load_for_cli,
    lost_rank_message,
)

if TYPE_CHECKING:
    from .session import ChatSession

__all__ = ["ChatSession", "ChatChunk", "Reply", "Repl", "main"]


def __getattr__(name):
    # The session API, imported on first use so that `--help` does not load MLX.
    if name in ("ChatSession", "ChatChunk", "Reply", "_common_prefix"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the REPL --------------------------------------------------------------------------------------------------

HELP = """Commands:
  q              quit (or Ctrl-D)
  r              reset the chat
  h              show this help
  /think on|off  thinking mode
  /steps N       denoising steps per canvas
  /seed N        reseed the sampler
  /canvas on|off show the canvas denoising live
  /image PATH    attach an image to the next message (repeatable)
Ctrl-C stops the reply being generated."""

REASONING_STYLE = "\x1b[3;90m"  # italic, grey


class Repl:
    def __init__(self, session: "ChatSession", canvas: bool | None = None, out=None, images=None, check=None):
        self.session = session
        self.check = check  # text -> a one-line note, or None (the demo model's out_of_range)
        self.pending_images: list[str] = []  # sent with the next message
        for path in images or []:
            self.attach(path, quiet=True)
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.canvas = self.tty if canvas is None else canvas

    def say(self, text: str = ""):
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run a REPL command; False to quit."""
        s = self.session
        word, _, arg = line.partition(" ")
        arg = arg.strip()
        if line == "q":
            return False
        if line == "r":
            s.reset()
            self.say("[chat reset]")
        elif line == "h":
            self.say(HELP)
        elif word in ("/think", "/canvas"):
            if arg not in ("on", "off", ""):
                self.say(f"usage: {word} on|off")
            elif word == "/think":
                if arg:
                    s.think = arg == "on"
                self.say(f"[thinking {'on' if s.think else 'off'}]")
            else:
                if arg:
                    self.canvas = arg == "on"
                self.say(f"[canvas {'on' if self.canvas else 'off'}]")
        elif word == "/image":
            if not arg:
                self.say("usage: /image PATH")
            else:
                try:
                    self.attach(arg)
                except ValueError as e:
                    self.say(f"error: {e}")
        elif word in ("/steps", "/seed"):
            try:
                value = int(arg)
            except ValueError:
                self.say(f"usage: {word} N (an integer)")
                return True
            if word == "/seed":
                s.seed = value
                self.say(f"[seed {value}]")
            else:
                try:
                    s.update_sampler(max_denoising_steps=value)
                    self.say(f"[{value} denoising steps per canvas]")
                except ValueError:
                    self.say("/steps: the number of steps must be a positive integer")
        else:
            self.say(f"unknown command {word} (h for help)")
        return True

    def attach(self, path: str, quiet: bool = False):
        """Read an image now (so a bad file is named at once) and keep it for the next message."""
        from .vision import require_vision

        (patches,) = require_vision(self.session.model).process([path], self.session.max_soft_tokens)
        self.pending_images.append(path)
        if not quiet:
            self.say(f"[image {path}: {patches.soft_tokens} soft tokens, sent with the next message]")

    def turn(self, text: str):
        from .display import CanvasView

        note = self.check(text) if self.check is not None else None
        if note:
            self.say(note)

        view = CanvasView(self.out, live=self.tty)  # drafts are drawn only when asked for
        in_answer, reasoning_shown = False, False
        reply = None
        previous = signal.signal(signal.SIGINT, lambda *_: self.session.cancel())
        try:
            images, self.pending_images = self.pending_images, []
            for chunk in self.session.stream(text, drafts=self.tty and self.canvas, images=images):
                if chunk.is_draft:
                    view.draft(chunk.draft)
                    continue
                if chunk.reasoning:
                    if not reasoning_shown:
                        view.commit("[thinking] ", REASONING_STYLE if self.tty else "")
                        reasoning_shown = True
                    view.commit(chunk.reasoning, REASONING_STYLE if self.tty else "")
                if chunk.text:
                    if reasoning_shown and not in_answer:
                        view.commit("\n\n")
                    in_answer = True
                    view.commit(chunk.text)
                if chunk.reply is not None:
                    reply = chunk.reply
        except (ValueError, RuntimeError) as e:  # a template that rejects the message, say: the chat goes on
            view.close()
            self.say(f"\nerror: {e}")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
            view.close()
        self.say()
        if reply.finish_reason == "cancelled":
            self.say("[stopped]")
        if reply.note:
            self.say(f"[no answer: {reply.note}]")
        self.say(reply.stats_line())

    def run(self) -> int:
        from .sharded import resting

        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.say("Type a message; h for help, q to quit.")
        while True:
            try:
                with resting(self.session.model):  # a distributed model's other ranks sleep while you type
                    line = input(">> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say()
                continue
            line = line.strip()
            if not line:
                continue
            if line in ("q", "r", "h") or line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.turn(line)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mlx_dgemma.chat", description="Chat with a DiffusionGemma model.")
    p.add_argument("--model", help="MLX or Hugging Face folder, or Hub id. Default: the bundled demo model.")
    p.add_argument("--adapter-path", help="LoRA adapters to apply.")
    p.add_argument("--system-prompt", help="System prompt.")
    p.add_argument("--max-tokens", "-m", type=int,
                   help="Token budget of one reply, reasoning included (default: the model's; 4x with --think).")
    p.add_argument("--canvas", action=argparse.BooleanOptionalAction, default=None,
                   help="Show the canvas denoising live (default: on in a terminal).")
    add_image_flags(p)
    add_sampler_flags(p)
    add_distributed_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .session import ChatSession

        check_positive_flags(args)
        model, tokenizer = load_for_cli(args.model, args.adapter_path, args)
        session = ChatSession(
            model, tokenizer, args.system_prompt, args.think, max_tokens=args.max_tokens, seed=args.seed,
            prefill_step_size=args.prefill_step_size, max_soft_tokens=args.max_soft_tokens,
            **{k: getattr(args, k) for k in SAMPLER_FLAGS},
        )
        check = None
        if args.model is None:
            from .demo import out_of_range as check
        return Repl(session, canvas=args.canvas, images=args.image, check=check).run()
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if lost_rank_message(e) is None:
            raise
        print(f"error: {lost_rank_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
