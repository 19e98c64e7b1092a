"""`python -m mlx_dgemma.generate --model PATH -p "Why is the sky blue?"`: the generation command line.

The library code lives below: the loop and the token API in `diffusion.py`, the text API in
`text_generation.py`. Their names are re-exported here (imported on first use, so that `--help` does not load
MLX), and the module itself can be called like the `generate` function.
"""

from __future__ import annotations

import argparse
import sys

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
    str2bool,
)
from .reexports import lazy_reexports

_LIBRARY = {
    "diffusion": ("RandomSource", "Draft", "Canvas", "DiffusionStats", "left_pad", "prefill", "lane_statistics",
                  "diffuse", "resolve_settings", "initial_canvas_ids", "cut_at_eos", "generate_tokens"),
    "text_generation": ("GenerationResponse", "prompt_ids", "stream_generate", "generate", "print_stats"),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mlx_dgemma.generate", description="Generate text with a DiffusionGemma model.")
    p.add_argument("--model", help="MLX or Hugging Face folder, or Hub id. Default: the bundled demo model.")
    p.add_argument("--adapter-path", help="LoRA adapters to apply.")
    p.add_argument("--prompt", "-p", help="Prompt text, or - to read stdin.")
    p.add_argument("--system-prompt", help="System prompt for the chat template.")
    p.add_argument("--max-tokens", "-m", type=int, help="Maximum new tokens (default: the model's, 256).")
    p.add_argument("--ignore-chat-template", action="store_true", help="Feed the prompt as is.")
    p.add_argument("--initial-canvas", help="Start the first canvas from this text (edit in place).")
    p.add_argument("--show-canvas", action="store_true", help="Show the canvas settling, live.")
    add_image_flags(p)
    p.add_argument("--verbose", type=str2bool, default=True, help="Print statistics (true/false, default true).")
    add_sampler_flags(p)
    add_distributed_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # before the library's imports: --help answers at once
    from .display import CanvasView
    from .text_generation import print_stats, stream_generate

    try:
        check_positive_flags(args)
        model, tokenizer = load_for_cli(args.model, args.adapter_path, args)
        prompt = args.prompt
        if prompt == "-":
            prompt = sys.stdin.read()
        if args.model is None:  # the bundled demo: say when the prompt is not one of its problems
            from . import demo

            prompt = demo.DEFAULT_PROMPT if prompt is None else prompt
            note = demo.out_of_range(prompt)
            if note:
                print(note, file=sys.stderr)
        elif prompt is None:
            prompt = "hello"
        view = CanvasView() if args.show_canvas else None
        overrides = {k: getattr(args, k) for k in SAMPLER_FLAGS}
        last, started = None, False
        for last in stream_generate(
            model, tokenizer, prompt, args.max_tokens, drafts=view is not None and view.live, seed=args.seed,
            system_prompt=args.system_prompt, enable_thinking=args.think, chat_template=not args.ignore_chat_template,
            initial_canvas=args.initial_canvas, prefill_step_size=args.prefill_step_size, images=args.image,
            max_soft_tokens=args.max_soft_tokens, **overrides,
        ):
            if args.verbose and not started:
                print("=" * 10)  # once the prompt has been accepted
                started = True
            if last.is_draft:
                view.draft(last.draft_text)
            elif view is not None:
                view.commit(last.text)
            else:
                print(last.text, end="", flush=True)
        if view is not None:
            view.close()
        print()
        if args.verbose and last is not None:
            print("=" * 10)
            print_stats(last)
        return 0
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if lost_rank_message(e) is None:
            raise
        print(f"error: {lost_rank_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130



lazy_reexports(__name__, _LIBRARY, call="generate")

if __name__ == "__main__":
    sys.exit(main())
