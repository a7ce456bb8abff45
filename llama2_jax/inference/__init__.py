"""Inference: one device stepper (slots) behind every door. Sampling, the shape arithmetic
(buckets), the slots, the drivers (generate, stream, Session), the scheduler, the prefix
cache, and lockstep replay over several processes."""
