"""ChatSession the way an app uses it: each turn runs on a worker thread, the UI thread receives drafts, reasoning
and answer text as events, and a Stop button calls `cancel()`.

    python examples/chat_session.py [--model PATH] [--think]

Without --model it runs the bundled demo model. The same calls work through a Python bridge from Swift
(PythonKit and the like): keep one ChatSession per conversation and read the events off the queue.
"""

from __future__ import annotations

import argparse
import queue
import threading

import mlx.core as mx

from mlx_dgemma import ChatSession
from mlx_dgemma.cli import load_for_cli


class ChatController:
    """What the app's bridge holds: one session, a worker thread per turn, a queue of events for the UI."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.events: queue.Queue = queue.Queue()

    def ask(self, text: str) -> threading.Thread:
        def work():
            try:
                for chunk in self.session.stream(text, drafts=True):
                    self.events.put(chunk)
            except Exception as e:  # shown to the user, the session stays usable
                self.events.put(e)
            finally:
                # MLX gives every thread its own streams; a worker that ends releases its own (without this, a
                # process whose worker threads ran compiled MLX functions may abort at exit).
                mx.clear_streams()
            self.events.put(None)  # end of turn

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        return worker

    def stop(self):
        """The Stop button: returns at once; the worker ends within one denoising step."""
        self.session.cancel()


def show_turn(controller: ChatController, text: str, stop_after_drafts: int | None = None):
    print(f"\nuser: {text}")
    worker = controller.ask(text)
    drafts = 0
    while (event := controller.events.get()) is not None:
        if isinstance(event, Exception):
            print(f"[error: {event}]")
        elif event.is_draft:
            drafts += 1  # an app redraws its canvas view here
            if stop_after_drafts is not None and drafts == stop_after_drafts:
                controller.stop()
        elif event.reply is not None:
            reply = event.reply
            print(f"\n[{reply.finish_reason}; {drafts} drafts drawn] {reply.stats_line()}")
            if reply.note:
                print(f"[no answer: {reply.note}]")
        else:
            if event.reasoning:
                print(f"(thinking) {event.reasoning}", end="", flush=True)
            if event.text:
                print(event.text, end="", flush=True)
    worker.join()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Model folder (default: the bundled demo model).")
    p.add_argument("--think", action="store_true")
    args = p.parse_args()
    model, tokenizer = load_for_cli(args.model)
    session = ChatSession(model, tokenizer, system_prompt="Answer briefly.", think=args.think, seed=0)
    controller = ChatController(session)

    show_turn(controller, "Sort: 7 2 9 4 1")
    show_turn(controller, "Now in descending order.")  # only this turn and the last reply are encoded
    show_turn(controller, "Write a long story.", stop_after_drafts=3)  # the user presses Stop
    print("\nhistory:")
    for message in session.history:
        print(f"  {message['role']}: {message['content']!r}")
    session.reset()  # a new conversation, same settings


if __name__ == "__main__":
    main()
