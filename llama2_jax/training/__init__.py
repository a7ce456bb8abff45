"""Training: dialog data, LoRA adapters, the jitted train step, TensorBoard events."""
