"""The server's command line: flags, loading the model (the bundled demo without --model), serving with uvicorn.

Under `mlx.launch` with --pipeline or --experts-parallel, rank 0 alone binds the port and serves; the other ranks
run rank 0's passes and repeat its batch's cache surgery (`sharded.py`), and exit when it does.

uvicorn is the ASGI server: a plain `pip install`, HTTP/1.1 keep-alive and streaming, and it tells the app when a
client disconnects, which is what frees a batch row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..cli import Parser, add_distributed_flags, add_sampler_flags, check_positive_flags, flag_message
from ..config import SAMPLER_FLAGS

DEFAULT_CONTEXT = 8192  # when a config names no max_position_embeddings


def build_parser():
    p = Parser(prog="python -m mlx_dgemma.server",
               description="Serve a DiffusionGemma model over the OpenAI and Ollama HTTP APIs.")
    p.add_argument("--model", help="MLX or Hugging Face folder, or Hub id. Default: the bundled demo model.")
    p.add_argument("--adapter-path", help="LoRA adapters to apply.")
    p.add_argument("--served-model-name", help="The model id to list (default: the folder's name).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8080, help="Port (default 8080).")
    p.add_argument("--api-key", default=os.environ.get("MLX_DGEMMA_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' (default: $MLX_DGEMMA_API_KEY; none: open).")
    p.add_argument("--allowed-origins", default="*", help="CORS origins, comma-separated (default *).")
    p.add_argument("--max-concurrency", type=int, default=4, help="Requests denoised together in one batch.")
    p.add_argument("--max-queue", type=int, default=32, help="Requests waiting beyond that; more get 429.")
    p.add_argument("--max-tokens", "-m", type=int,
                   help="Default reply budget (default: the model's max_new_tokens; 4x with thinking on).")
    p.add_argument("--context-length", type=int, help="Context limit (default: the model's max_position_embeddings).")
    p.add_argument("--prompt-cache-size", type=int, default=16, help="Prompt prefixes kept (0: none).")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_sampler_flags(p)
    add_distributed_flags(p)
    return p


def _folder(model_path: str | None) -> Path:
    from .. import demo
    from ..checkpoint import resolve_checkpoint

    return demo.FOLDER if model_path is None else resolve_checkpoint(model_path)


def _size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def build_state(args, model, tokenizer, folder: Path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..session import THINKING_BUDGET_FACTOR
    from .app import ServerState
    from .prompt_cache import PromptCache
    from .request import ServerContext
    from .scheduler import Scheduler

    if tokenizer is None:
        raise ValueError(f"{folder}: the server needs a tokenizer (tokenizer.json) in the model folder")
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    context = args.context_length or text.get("max_position_embeddings") or DEFAULT_CONTEXT
    overrides = {k: getattr(args, k) for k in SAMPLER_FLAGS if getattr(args, k) is not None}
    if overrides:
        model.sampler_defaults = model.sampler_defaults.updated(**overrides)
    params = tree_flatten(model.parameters())
    weights_bytes = sum(v.nbytes for _, v in params)
    ctx = ServerContext(
        tokenizer=tokenizer, model_name=args.served_model_name or ("mlx_dgemma-demo" if args.model is None
                                                                   else folder.name),
        canvas_length=model.args.canvas_length, context_length=int(context),
        default_max_tokens=args.max_tokens or model.sampler_defaults.max_new_tokens,
        thinking_budget_factor=1 if args.max_tokens else THINKING_BUDGET_FACTOR, think=args.think,
        vision=getattr(model, "vision", None),
    )
    scheduler = Scheduler(model, tokenizer, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          prompt_cache=PromptCache(args.prompt_cache_size), prefill_step_size=args.prefill_step_size)
    quant = config.get("quantization") or {}
    return ServerState(
        model=model, tokenizer=tokenizer, scheduler=scheduler, context=ctx, model_name=ctx.model_name,
        loaded_at=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), weights_bytes=weights_bytes,
        parameter_size=_size(sum(v.size for _, v in params)),
        quantization=f"Q{quant['bits']}" if quant.get("bits") else str(mx.float32 if not params else params[0][1].dtype),
        digest="sha256:" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest(),
    )


def check_flags(args):
    check_positive_flags(args)
    for flag in ("max_concurrency", "port", "context_length"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("max_queue", "prompt_cache_size"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_flags(args)
        import uvicorn

        from ..cli import load_for_cli
        from .app import create_app

        model, tokenizer = load_for_cli(args.model, args.adapter_path, args)  # other ranks serve rank 0 in here
        state = build_state(args, model, tokenizer, _folder(args.model))
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    app = create_app(state, api_key=args.api_key, allowed_origins=origins)
    state.scheduler.start()
    if getattr(model, "size", 1) > 1:  # a distributed model (`sharded.py`)
        print(f"distributed: {model.size} ranks, --{'pipeline' if model.mode == 'pipeline' else 'experts-parallel'};"
              f" rank 0 serves HTTP, the others follow it", file=sys.stderr, flush=True)
    print(f"serving {state.model_name} on http://{args.host}:{args.port} (OpenAI: /v1, Ollama: /api); "
          f"batch of {state.scheduler.max_concurrency}, queue {args.max_queue}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    except KeyboardInterrupt:
        pass
    finally:
        state.scheduler.stop()
    return 0
