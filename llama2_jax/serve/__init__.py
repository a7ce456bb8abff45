"""The OpenAI-compatible server: `python -m llama2_jax.serve --config configs/serve_demo.py`.

main.py (settings, start-up, signals), api.py (routes, errors, limits), generation.py (one
request's choices: text, stop strings, logprobs), schemas.py (pydantic bodies), text.py
(detokenizing), metrics.py (Prometheus). The device side is llama2_jax.inference.scheduler.
"""
