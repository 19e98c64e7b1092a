"""`python -m mlx_dgemma.server`: DiffusionGemma behind the OpenAI and Ollama HTTP APIs, batching requests.

    python -m mlx_dgemma.server --model dgemma-4bit --port 8080

Modules, one job each: `request` (bodies checked into a `GenerationRequest`; `errors` holds its `RequestError`),
`messages` (chat messages and images as the template takes them), `scheduler` (the thread that owns
the model and the batch), `batch` (per-row randomness and the cache surgery for rows joining and leaving),
`prompt_cache`, `output` (ids -> answer / reasoning / tool calls, stop strings), `tool_calls` (Gemma 4's call
syntax), `runner` (the async side of one request), `openai_api` and `ollama_api` (the two wire shapes), `app`
(routes, API key, CORS, errors) and `cli` (flags, loading, uvicorn).
"""
