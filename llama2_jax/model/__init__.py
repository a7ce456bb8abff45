"""The model: architecture (config), the transformer, its KV cache, quantized weights, the
sharding rules (the only place that knows mesh axis names) and orbax checkpoints."""
